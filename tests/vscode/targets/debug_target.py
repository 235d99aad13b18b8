"""The tiny test the pytest configurations are debugged on (not collected by the suite)."""


def test_debug_target() -> None:
    answer = 6 * 7
    assert answer == 42  # the harness's breakpoint
