"""What the training-loop callbacks share: the cadence of the utilization images.

Nothing here imports a training framework.
"""

from __future__ import annotations


class ImageCadence:
    """When the heatmap and k histogram are due: at a logging step at least ``every``
    optimizer steps after the last one that had them (the first: at step ``every`` or the
    first logging step after it); never when ``every`` is None.

    Raises:
        ValueError: ``every`` is neither None nor a positive integer.
    """

    def __init__(self, every: int | None) -> None:
        wrong = isinstance(every, bool) or not isinstance(every, int) or every < 1
        if every is not None and wrong:
            raise ValueError(f"images_every must be a positive integer or None; got {every!r}")
        self.every = every
        self.last: int | None = None

    def due(self, step: int) -> bool:
        """Whether the images are due at optimizer step ``step``."""
        if self.every is None:
            return False
        if self.last is None:
            return step >= self.every
        return step - self.last >= self.every

    def written(self, step: int) -> None:
        """The images were written at optimizer step ``step``."""
        self.last = step
