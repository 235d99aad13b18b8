"""Fast-path kernels: Triton kernels and the code that launches them.

Each kernel sits beside the plain reference it must match: the routers' kernels
(``triton_router``, ``triton_dispatch``, ``triton_experts``, ``triton_grouped``) compute what
``moe_devkit.routers.torch_router`` computes in PyTorch ops, and ``inspector_update`` what
the inspector's per-layer state update computes. ``moe_layer`` decides, for the reference
layer's ``implementation="auto" | "reference" | "triton"``, which of them a forward takes.
Triton is imported only when a kernel is first used, so importing this package needs no
Triton and no GPU.
"""
