"""What the training commands (numerics, gradients, memory) share: a bad option or a model
that cannot be built is one usage line and exit 2."""

from __future__ import annotations

import pytest

from moe_devkit.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["numerics", "--plant-nan", "no.such.module", "--steps", "1"],
        ["numerics", "--steps", "0"],
        ["gradients", "--min-k", "3", "--max-k", "2"],
        ["gradients", "--device", "tpu"],
        ["memory", "--steps", "3", "--warmup", "5"],
        ["memory", "--tolerance", "-1"],
    ],
)
def test_bad_arguments_exit_2_without_traceback(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error" in err
