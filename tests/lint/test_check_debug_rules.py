"""Each rule: a positive and a negative case, every import form, the print policy, noqa."""

from __future__ import annotations

import textwrap

import pytest

from moe_devkit.lint import Settings, check_source


def check(source: str, path: str = "pkg/mod.py", settings: Settings | None = None) -> list[str]:
    return [str(f) for f in check_source(textwrap.dedent(source), path, settings)]


FLAGGED = [
    # debugger calls, every debugger module the rules know
    ("import pdb\npdb.set_trace()\n", "2:1: DBG002 debugger call `pdb.set_trace()`"),
    ("import pdb\npdb.post_mortem()\n", "2:1: DBG002 debugger call `pdb.post_mortem()`"),
    ("import pdb\npdb.pm()\n", "2:1: DBG002 debugger call `pdb.pm()`"),
    ("import pdb\npdb.run('f()')\n", "2:1: DBG002 debugger call `pdb.run()`"),
    ("import pdb\npdb.runcall(f)\n", "2:1: DBG002 debugger call `pdb.runcall()`"),
    ("import pdb\npdb.Pdb().set_trace()\n", "2:1: DBG002 debugger call `pdb.Pdb.set_trace()`"),
    ("import ipdb\nipdb.set_trace()\n", "2:1: DBG002 debugger call `ipdb.set_trace()`"),
    (
        "import ipdb\nwith ipdb.launch_ipdb_on_exception():\n    f()\n",
        "2:6: DBG002 debugger call `ipdb.launch_ipdb_on_exception()`",
    ),
    ("import pudb\npudb.set_trace()\n", "2:1: DBG002 debugger call `pudb.set_trace()`"),
    ("import wdb\nwdb.set_trace()\n", "2:1: DBG002 debugger call `wdb.set_trace()`"),
    ("import rpdb\nrpdb.set_trace()\n", "2:1: DBG002 debugger call `rpdb.set_trace()`"),
    (
        "import remote_pdb\nremote_pdb.set_trace()\n",
        "2:1: DBG002 debugger call `remote_pdb.set_trace()`",
    ),
    ("import web_pdb\nweb_pdb.set_trace()\n", "2:1: DBG002 debugger call `web_pdb.set_trace()`"),
    ("import q\nq(x)\n", "2:1: DBG002 debugger call `q()`"),
    ("import q\nq.d()\n", "2:1: DBG002 debugger call `q.d()`"),
    ("import pydevd\npydevd.settrace()\n", "2:1: DBG002 debugger call `pydevd.settrace()`"),
    (
        "import pydevd_pycharm\npydevd_pycharm.settrace('h')\n",
        "2:1: DBG002 debugger call `pydevd_pycharm.settrace()`",
    ),
    ("import debugpy\ndebugpy.listen(5678)\n", "2:1: DBG002 debugger call `debugpy.listen()`"),
    (
        "import debugpy\ndebugpy.wait_for_client()\n",
        "2:1: DBG002 debugger call `debugpy.wait_for_client()`",
    ),
    ("import debugpy\ndebugpy.breakpoint()\n", "2:1: DBG002 debugger call `debugpy.breakpoint()`"),
    # ptvsd, debugpy's predecessor: every call, as for debugpy
    (
        "import ptvsd\nptvsd.break_into_debugger()\n",
        "2:1: DBG002 debugger call `ptvsd.break_into_debugger()`",
    ),
    (
        "import ptvsd\nptvsd.enable_attach(address=('0.0.0.0', 5678))\n",
        "2:1: DBG002 debugger call `ptvsd.enable_attach()`",
    ),
    (
        "from ptvsd import wait_for_attach\nwait_for_attach()\n",
        "2:1: DBG002 debugger call `ptvsd.wait_for_attach()`",
    ),
    ("import bpdb\nbpdb.set_trace()\n", "2:1: DBG002 debugger call `bpdb.set_trace()`"),
    ("import pdbr\npdbr.set_trace()\n", "2:1: DBG002 debugger call `pdbr.set_trace()`"),
    (
        "from IPython.frontend.terminal.embed import InteractiveShellEmbed\n"
        "InteractiveShellEmbed()()\n",
        "2:1: DBG002 debugger call `IPython.frontend.terminal.embed.InteractiveShellEmbed()`",
    ),
    # a debugger function bound to another name first
    ("import ipdb\nt = ipdb.set_trace\nt()\n", "3:1: DBG002 debugger call `ipdb.set_trace()`"),
    (
        "import pdb\ndef f():\n    bp = pdb.set_trace\n    bp()\n",
        "4:5: DBG002 debugger call `pdb.set_trace()`",
    ),
    ("import pdb\na = pdb\nb = a.set_trace\nb()\n", "4:1: DBG002 debugger call `pdb.set_trace()`"),
    (
        "import IPython\nshell = IPython.embed\nshell()\n",
        "3:1: DBG002 debugger call `IPython.embed()`",
    ),
    # q as a decorator: it is called with the function
    ("import q\n@q\ndef f():\n    pass\n", "2:2: DBG002 debugger decorator `@q`"),
    ("import q\n@q.t\ndef f():\n    pass\n", "2:2: DBG002 debugger decorator `@q.t`"),
    ("import os, q\n@q\ndef f():\n    pass\n", "2:2: DBG002 debugger decorator `@q`"),
    (
        "from q import q as trace\n@trace\nclass C:\n    pass\n",
        "2:2: DBG002 debugger decorator `@q.q`",
    ),
    (
        "import ipdb\n@ipdb.launch_ipdb_on_exception()\ndef f():\n    pass\n",
        "2:2: DBG002 debugger call `ipdb.launch_ipdb_on_exception()`",
    ),
    ("import IPython\nIPython.embed()\n", "2:1: DBG002 debugger call `IPython.embed()`"),
    (
        "from IPython.terminal.embed import InteractiveShellEmbed\nInteractiveShellEmbed()()\n",
        "2:1: DBG002 debugger call `IPython.terminal.embed.InteractiveShellEmbed()`",
    ),
    (
        "import IPython\nIPython.start_ipython()\n",
        "2:1: DBG002 debugger call `IPython.start_ipython()`",
    ),
    ("import code\ncode.interact(local=locals())\n", "2:1: DBG002 debugger call `code.interact()`"),
    ("import pytest\npytest.set_trace()\n", "2:1: DBG002 debugger call `pytest.set_trace()`"),
    (
        "from celery.contrib import rdb\nrdb.set_trace()\n",
        "2:1: DBG002 debugger call `celery.contrib.rdb.set_trace()`",
    ),
    # the builtin breakpoint and its hook
    ("breakpoint()\n", "1:1: DBG003 `breakpoint()` left in code"),
    ("import builtins\nbuiltins.breakpoint()\n", "2:1: DBG003 `breakpoint()` left in code"),
    ("import sys\nsys.breakpointhook()\n", "2:1: DBG003 `sys.breakpointhook()` left in code"),
    (
        "import sys\nsys.__breakpointhook__()\n",
        "2:1: DBG003 `sys.__breakpointhook__()` left in code",
    ),
    (
        "from sys import breakpointhook\nbreakpointhook()\n",
        "2:1: DBG003 `sys.breakpointhook()` left in code",
    ),
    (
        "from sys import __breakpointhook__ as hook\nhook()\n",
        "2:1: DBG003 `sys.__breakpointhook__()` left in code",
    ),
    ("from builtins import breakpoint\nbreakpoint()\n", "2:1: DBG003 `breakpoint()` left in code"),
    ("bp = breakpoint\nbp()\n", "2:1: DBG003 `breakpoint()` left in code"),
    (
        "import sys\nhook = sys.breakpointhook\nhook()\n",
        "3:1: DBG003 `sys.breakpointhook()` left in code",
    ),
    ("x = f(breakpoint())\n", "1:7: DBG003 `breakpoint()` left in code"),
    ("x = f(\n    breakpoint()\n)\n", "1:1: DBG003 `breakpoint()` left in code"),
    # prints
    ("print('x')\n", "1:1: DBG101 `print()` in library code"),
    ("import sys\nprint('x', file=sys.stderr)\n", "2:1: DBG101 `print()` in library code"),
    ("print('x', file=None)\n", "1:1: DBG101 `print()` in library code"),
    ("import builtins\nbuiltins.print('x')\n", "2:1: DBG101 `print()` in library code"),
    ("echo = print\necho('x')\n", "2:1: DBG101 `print()` in library code"),
    (
        "from builtins import print as echo\necho('x')\n",
        "2:1: DBG101 `print()` in library code",
    ),
    ("from pprint import pprint\npprint(x)\n", "2:1: DBG102 `pprint()` in library code"),
    ("import pprint\npprint.pp(x)\n", "2:1: DBG102 `pp()` in library code"),
    ("from pprint import pp as show\nshow(x)\n", "2:1: DBG102 `pp()` in library code"),
    # ML leftovers
    (
        "import torch\ntorch.autograd.set_detect_anomaly(True)\n",
        "2:1: DBG201 autograd anomaly detection enabled",
    ),
    (
        "from torch.autograd import set_detect_anomaly\nset_detect_anomaly(mode=True)\n",
        "2:1: DBG201 autograd anomaly detection enabled",
    ),
    (
        "import torch\nwith torch.autograd.detect_anomaly():\n    loss.backward()\n",
        "2:6: DBG201 autograd anomaly detection enabled (`detect_anomaly()`)",
    ),
    (
        "import torch\ntorch.cuda.set_sync_debug_mode(1)\n",
        "2:1: DBG202 CUDA sync debug mode enabled",
    ),
    (
        "import torch\ntorch.cuda.set_sync_debug_mode('warn')\n",
        "2:1: DBG202 CUDA sync debug mode enabled",
    ),
    (
        "import os\nos.environ['CUDA_LAUNCH_BLOCKING'] = '1'\n",
        "2:1: DBG203 debug environment variable `CUDA_LAUNCH_BLOCKING` set in code",
    ),
    (
        "import os\nos.environ.setdefault('TORCH_SHOW_CPP_STACKTRACES', '1')\n",
        "2:1: DBG203 debug environment variable `TORCH_SHOW_CPP_STACKTRACES` set in code",
    ),
    (
        "import os\nos.environ.update({'JAX_DISABLE_JIT': 'true'})\n",
        "2:1: DBG203 debug environment variable `JAX_DISABLE_JIT` set in code",
    ),
    (
        "import os\nos.environ.update(JAX_DEBUG_NANS='1')\n",
        "2:1: DBG203 debug environment variable `JAX_DEBUG_NANS` set in code",
    ),
    (
        "import os\nos.putenv('CUDA_LAUNCH_BLOCKING', '1')\n",
        "2:1: DBG203 debug environment variable `CUDA_LAUNCH_BLOCKING` set in code",
    ),
    (
        "from os import environ as env\nenv['CUDA_LAUNCH_BLOCKING'] = '1'\n",
        "2:1: DBG203 debug environment variable `CUDA_LAUNCH_BLOCKING` set in code",
    ),
    (
        "import jax\njax.config.update('jax_disable_jit', True)\n",
        "2:1: DBG204 JAX debug flag `jax_disable_jit` enabled",
    ),
    (
        "from jax import config\nconfig.update('jax_debug_nans', True)\n",
        "2:1: DBG204 JAX debug flag `jax_debug_nans` enabled",
    ),
    (
        "import jax\njax.config.update('jax_debug_infs', True)\n",
        "2:1: DBG204 JAX debug flag `jax_debug_infs` enabled",
    ),
    (
        "import jax\nwith jax.disable_jit():\n    f()\n",
        "2:6: DBG204 `jax.disable_jit()` left in code",
    ),
    ("import jax\njax.debug.breakpoint()\n", "2:1: DBG205 `jax.debug.breakpoint()` left in code"),
    ("import jax\njax.debug.print('{x}', x=x)\n", "2:1: DBG206 `jax.debug.print()` left in code"),
]


@pytest.mark.parametrize(("source", "expected"), FLAGGED)
def test_flagged(source: str, expected: str) -> None:
    found = [line for line in check(source) if "DBG001" not in line]
    assert found == [f"pkg/mod.py:{expected}"]


NOT_FLAGGED = [
    "def print(*args):\n    pass\nprint('x')\n",  # a module's own print
    "def breakpoint():\n    pass\nbreakpoint()\n",
    "def f(print):\n    print('x')\n",  # a parameter shadows the builtin
    "def f():\n    breakpoint = g\n    breakpoint()\n",
    "self.embed()\n",
    "logger.print('x')\n",  # a method .print() on another object
    "from .pdb import set_trace\nset_trace()\n",  # relative import: not the debugger
    "from . import pdb\npdb.set_trace()\n",
    "s = 'pdb.set_trace()'\n# breakpoint()\n",  # strings and comments
    '"""Call breakpoint() or print() here."""\n',
    "import os\nos.environ['CUDA_LAUNCH_BLOCKING'] = '0'\n",  # the disabling forms
    "import os\nx = os.environ['CUDA_LAUNCH_BLOCKING']\n",  # only read
    "import os\nos.environ.get('CUDA_LAUNCH_BLOCKING')\n",
    "import os\nos.environ['CUDA_LAUNCH_BLOCKING'] = flag\n",  # not a literal: configurable
    "import os\nos.environ['OTHER'] = '1'\n",
    "import torch\ntorch.autograd.set_detect_anomaly(False)\n",
    "import torch\ntorch.autograd.set_detect_anomaly(args.debug)\n",
    "import torch\ntorch.cuda.set_sync_debug_mode(0)\n",
    "import torch\ntorch.cuda.set_sync_debug_mode('default')\n",
    "import jax\njax.config.update('jax_disable_jit', False)\n",
    "import jax\njax.config.update('jax_enable_x64', True)\n",
    "import jax\nwith jax.disable_jit(False):\n    f()\n",
    "import IPython\nIPython.get_ipython()\n",  # IPython itself is not a debugger
    "import code\ncode.compile_command('x')\n",
    "print('x', file=fh)\n",  # to a file
    "import pprint\npprint.pprint(x, stream=fh)\n",
    "if __name__ == '__main__':\n    print('x')\n",
    "if '__main__' == __name__:\n    print('x')\n",
    "class A:\n    def print(self):\n        pass\n    def f(self):\n        self.print()\n",
    "import jax.numpy as jnp\njnp.sum(x)\n",
    # the hook saved and restored, never called
    "import sys\nsaved = sys.breakpointhook\nsys.breakpointhook = hook\n"
    "sys.breakpointhook = saved\n",
    "import sys\nsys.breakpointhook = sys.__breakpointhook__\n",
    # an alias of something else, or rebinding itself
    "t = logger.set_trace\nt()\n",
    "def f(node):\n" + "".join(f"    node = node.child{i}\n" for i in range(12)) + "    node()\n",
    "print = print\n",
    "x = q, r\nq.t(x)\n",  # a name q, not the module
    # prints in definitions inside the main block follow the main block's policy
    "if __name__ == '__main__':\n    def main():\n        print('x')\n    main()\n",
    "if __name__ == '__main__':\n    class C:\n        def run(self):\n            print('x')\n",
    "if __name__ == '__main__':\n    show = lambda x: print(x)\n",
]


@pytest.mark.parametrize("source", NOT_FLAGGED)
def test_not_flagged(source: str) -> None:
    assert check(source) == []


IMPORT_FORMS = [
    ("import pdb as p\np.set_trace()\n", "pdb.set_trace"),
    ("from ipdb import set_trace as st\nst()\n", "ipdb.set_trace"),
    ("from pdb import post_mortem as pm_debug\npm_debug()\n", "pdb.post_mortem"),
    ("from pdb import *\nset_trace()\n", "pdb.set_trace"),
    (
        "import IPython.core.debugger\nIPython.core.debugger.set_trace()\n",
        "IPython.core.debugger.set_trace",
    ),
    ("__import__('pdb').set_trace()\n", "pdb.set_trace"),
    ("import importlib\nimportlib.import_module('pdb').set_trace()\n", "pdb.set_trace"),
    ("p = __import__('pdb')\np.set_trace()\n", "pdb.set_trace"),
    ("def f():\n    import pdb\n    pdb.set_trace()\n", "pdb.set_trace"),
    (
        "try:\n    import ipdb as pdb\nexcept ImportError:\n    import pdb\npdb.set_trace()\n",
        "ipdb.set_trace",
    ),
    ("import pdb\ndef f():\n    def g():\n        pdb.set_trace()\n", "pdb.set_trace"),
    ("def f():\n    global pdb\n    import pdb\npdb.set_trace()\n", "pdb.set_trace"),
]


@pytest.mark.parametrize(("source", "qualname"), IMPORT_FORMS)
def test_import_forms(source: str, qualname: str) -> None:
    found = [line for line in check(source) if "DBG002" in line]
    assert len(found) == 1
    assert f"debugger call `{qualname}()`" in found[0]


@pytest.mark.parametrize(("source", "expected"), FLAGGED)
def test_flagged_examples_pass_the_prefilter(source: str, expected: str) -> None:
    """Parsing every file (`--all-syntax`) finds nothing that the text pre-filter hides."""
    assert check(source) == check(source, settings=Settings(all_syntax=True))


def test_breakpoint_names_imported_from_builtins_and_sys() -> None:
    source = (
        "import builtins, sys\n"
        "from builtins import breakpoint\n"
        "from sys import argv, breakpointhook, __breakpointhook__ as hook\n"
    )
    assert check(source) == [
        "pkg/mod.py:2:1: DBG001 import of debugger `builtins.breakpoint`",
        "pkg/mod.py:3:1: DBG001 import of debugger `sys.breakpointhook`, `sys.__breakpointhook__`",
    ]


def test_ptvsd_import() -> None:
    assert check("import ptvsd\nfrom ptvsd import enable_attach\n") == [
        "pkg/mod.py:1:1: DBG001 import of debugger `ptvsd`",
        "pkg/mod.py:2:1: DBG001 import of debugger `ptvsd.enable_attach`",
    ]


PDB_SUBCLASSES = [
    "import pdb\nclass P(pdb.Pdb):\n    def set_trace(self, frame=None):\n"
    "        super().set_trace(frame)\n",
    "import pdb\nclass P(pdb.Pdb):\n    def interaction(self, *args):\n"
    "        pdb.Pdb.interaction(self, *args)\n",
    "from pdb import Pdb\nclass P(Pdb):\n    def set_trace(self, frame=None):\n"
    "        Pdb.set_trace(self, frame)\n",
    "import pdb\nclass P(pdb.Pdb):\n    def set_trace(self):\n        pass\n"
    "def f(p):\n    p.set_trace()\n",
]


@pytest.mark.parametrize("source", PDB_SUBCLASSES)
def test_a_pdb_subclass_is_not_a_leftover(source: str) -> None:
    """Only the import is reported (DBG001, as for any module that imports pdb)."""
    (found,) = check(source)
    assert found.startswith("pkg/mod.py:1:1: DBG001 import of debugger `pdb")


def test_a_real_leftover_in_a_pdb_subclass_is_flagged() -> None:
    source = (
        "import pdb\n"
        "class P(pdb.Pdb):\n"
        "    def interaction(self, *args):\n"
        "        pdb.set_trace()\n"
        "        pdb.Pdb().set_trace()\n"
        "        pdb.Pdb.interaction(self, *args)\n"
    )
    assert check(source) == [
        "pkg/mod.py:1:1: DBG001 import of debugger `pdb`",
        "pkg/mod.py:4:9: DBG002 debugger call `pdb.set_trace()`",
        "pkg/mod.py:5:9: DBG002 debugger call `pdb.Pdb.set_trace()`",
    ]


def test_print_in_a_main_block_definition_follows_the_main_block_policy() -> None:
    source = "if __name__ == '__main__':\n    def main():\n        print('x')\n"
    assert check(source) == []
    strict = Settings(allow_main_block=False)
    assert check(source, settings=strict) == ["pkg/mod.py:3:9: DBG101 `print()` in library code"]
    outside = "def main():\n    print('x')\nif __name__ == '__main__':\n    main()\n"
    assert check(outside) == ["pkg/mod.py:2:5: DBG101 `print()` in library code"]


def test_imports_are_reported_once_per_statement() -> None:
    assert check("import os, pdb, ipdb as i\nfrom IPython import embed, get_ipython\n") == [
        "pkg/mod.py:1:1: DBG001 import of debugger `pdb`, `ipdb`",
        "pkg/mod.py:2:1: DBG001 import of debugger `IPython.embed`",
    ]


def test_dynamic_import_statement() -> None:
    assert check("import importlib\nm = importlib.import_module('pudb')\n") == [
        "pkg/mod.py:2:5: DBG004 debugger `pudb` imported dynamically"
    ]


def test_class_scope_does_not_leak_into_methods() -> None:
    source = "class A:\n    print = staticmethod(log)\n    def f(self):\n        print('x')\n"
    assert check(source) == ["pkg/mod.py:4:9: DBG101 `print()` in library code"]


@pytest.mark.parametrize(
    "path", ["tests/test_x.py", "pkg/tests/helpers.py", "test_x.py", "x_test.py", "scripts/run.py"]
)
def test_print_allowed_in_tests_and_scripts(path: str) -> None:
    assert check("print('x')\n", path) == []


def test_print_allowed_in_main_module() -> None:
    assert check("print('x')\n", "pkg/__main__.py") == []


def test_print_policy_is_configurable() -> None:
    strict = Settings(print_allowed_paths=(), allow_print_to_file=False, allow_main_block=False)
    source = "print('x', file=fh)\nif __name__ == '__main__':\n    print('y')\n"
    assert check(source, "tests/test_x.py", strict) == [
        "tests/test_x.py:1:1: DBG101 `print()` in library code",
        "tests/test_x.py:3:5: DBG101 `print()` in library code",
    ]


def test_breakpoint_still_flagged_in_tests() -> None:
    assert check("breakpoint()\n", "tests/test_x.py") == [
        "tests/test_x.py:1:1: DBG003 `breakpoint()` left in code"
    ]


NOQA = [
    ("breakpoint()  # noqa\n", []),
    ("breakpoint()  # noqa: DBG003\n", []),
    ("breakpoint()  # noqa:DBG003,E501\n", []),
    ("breakpoint()  # NOQA: T100\n", []),
    ("import pdb  # noqa: T100\n", []),
    ("print('x')  # noqa: T201\n", []),
    ("from pprint import pprint\npprint(x)  # noqa: T203\n", []),
    ("breakpoint()  # noqa: E501\n", ["pkg/mod.py:1:1: DBG003 `breakpoint()` left in code"]),
    ("print('x')  # noqa: T203\n", ["pkg/mod.py:1:1: DBG101 `print()` in library code"]),
    ("breakpoint()  # noqa: DBG101\n", ["pkg/mod.py:1:1: DBG003 `breakpoint()` left in code"]),
    ("x = '# noqa'; breakpoint()\n", ["pkg/mod.py:1:15: DBG003 `breakpoint()` left in code"]),
    ("f(  # noqa: DBG003\n    breakpoint()\n)\n", []),
]


@pytest.mark.parametrize(("source", "expected"), NOQA)
def test_noqa(source: str, expected: list[str]) -> None:
    assert check(source) == expected


def test_select_and_ignore() -> None:
    source = "import pdb\npdb.set_trace()\nprint('x')\n"
    assert check(source, settings=Settings(select=("DBG1",))) == [
        "pkg/mod.py:3:1: DBG101 `print()` in library code"
    ]
    assert check(source, settings=Settings(ignore=("DBG0",))) == [
        "pkg/mod.py:3:1: DBG101 `print()` in library code"
    ]
    per_file = Settings(per_file_ignores=(("pkg/*", ("DBG101",)),))
    assert len(check(source, settings=per_file)) == 2


def test_column_counts_characters_not_bytes() -> None:
    assert check("x = 'é'; breakpoint()\n") == [
        "pkg/mod.py:1:10: DBG003 `breakpoint()` left in code"
    ]


def test_python_312_syntax() -> None:
    source = (
        "type Alias = list[int]\n"
        "def f[T](x: T) -> T:\n"
        "    breakpoint()\n"
        "    return x\n"
        "class C[T]:\n"
        "    pass\n"
        's = f"{\'a\' + "b"}"\n'
        "print(s)\n"
    )
    assert check(source) == [
        "pkg/mod.py:3:5: DBG003 `breakpoint()` left in code",
        "pkg/mod.py:8:1: DBG101 `print()` in library code",
    ]
