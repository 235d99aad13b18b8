"""Runnable reference steps laid out for a debugger (the targets of ``.vscode/launch.json``).

* ``python -m moe_devkit.debug.torch_step --device cpu|cuda``: one training step of the
  reference PyTorch MoEModel with anomaly detection, sync-debug mode (CUDA) and no compilation.
* ``python -m moe_devkit.debug.jax_step --platform cpu|gpu``: one step of the JAX router with
  jit disabled, NaN checking on, unfiltered tracebacks and no GPU memory preallocation.

``moe_devkit.debug.switches`` holds the switches; each step module sets the environment
variables before it imports its framework, so they work from a plain shell too.
"""
