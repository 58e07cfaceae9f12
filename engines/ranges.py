"""Activation ranges for calibrated int8: the largest magnitude each tensor is given a code for.

Symmetric int8 (zero point 0) needs one number per tensor, ``amax``: values in ``[-amax, amax]`` get the
codes ``-127..127`` (scale ``amax / 127``). Three ways to pick it from the values the calibration feeds
produce, all on ``|x|``:

``minmax``      the largest ``|x|`` seen: nothing clips, but one outlier spreads the codes thin.
``percentile``  the ``p``-th percentile of ``|x|`` (default 99.99): the rarest values clip.
``entropy``     the threshold whose 128-level quantized histogram is closest (KL divergence) to the
                real one: TensorRT's classic calibrator.

The last two read a histogram of ``|x|`` with :data:`BINS` bins over ``[0, max]``, so they need the max
first: :class:`RangeObserver` makes two passes over the feeds (``passes``), the first for the max, the
second for the histogram. Only one number per bin is kept, whatever the tensor's shape, so samples of
different shapes (a decoder's prefill and its decode steps) mix freely.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BINS = 2048  # histogram bins over [0, max |x|]
QUANT_LEVELS = 128  # entropy: levels of a symmetric int8 half-range
METHODS = ("minmax", "percentile", "entropy")


class RangeObserver:
    """Collects the statistics of named tensors, feed after feed, and gives each one's ``amax``."""

    def __init__(self, method: str = "percentile", percentile: float = 99.99, bins: int = BINS):
        if method not in METHODS:
            raise ValueError(f"unknown range method {method!r}; known: {', '.join(METHODS)}")
        self.method, self.percentile, self.bins = method, percentile, bins
        self.peak: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}
        self.pass_ = 0

    @property
    def passes(self) -> int:
        """How many times the feeds must be observed: 1 for minmax, 2 for the histogram methods."""
        return 1 if self.method == "minmax" else 2

    def next_pass(self) -> None:
        self.pass_ += 1

    def observe(self, values: dict[str, np.ndarray]) -> None:
        """Fold one feed's values of each tensor into its statistics (of the current pass)."""
        for name, a in values.items():
            a = np.asarray(a)
            if a.size == 0:
                continue
            if self.pass_ == 0:
                m = float(np.abs(a).max())
                self.peak[name] = max(self.peak.get(name, 0.0), m) if np.isfinite(m) else self.peak.get(name, 0.0)
            else:
                self._histogram(name, a)

    def _histogram(self, name: str, a: np.ndarray) -> None:
        top = self.peak.get(name, 0.0)
        if top <= 0.0:
            return
        mag = np.abs(a.reshape(-1), dtype=np.float32)
        idx = np.multiply(mag, np.float32(self.bins / top), out=mag).astype(np.int32)
        np.minimum(idx, self.bins - 1, out=idx)  # |x| == max lands in the last bin
        counts = np.bincount(idx, minlength=self.bins)[: self.bins]
        if name in self.hist:
            self.hist[name] += counts
        else:
            self.hist[name] = counts.astype(np.int64)

    def amax(self, name: str) -> float:
        """The range picked for ``name`` (0.0 when it was never seen, or was all zeros)."""
        top = self.peak.get(name, 0.0)
        if self.method == "minmax" or top <= 0.0 or name not in self.hist:
            return top
        h = self.hist[name]
        width = top / self.bins
        if self.method == "percentile":
            return percentile_threshold(h, self.percentile) * width
        return entropy_threshold(h) * width

    def ranges(self, names: Iterable[str]) -> dict[str, float]:
        return {n: self.amax(n) for n in names}


def percentile_threshold(hist: np.ndarray, percentile: float) -> int:
    """The number of bins (from 0) holding ``percentile`` % of the counts: the threshold's right edge."""
    cdf = np.cumsum(hist, dtype=np.float64)
    total = cdf[-1]
    if total <= 0:
        return len(hist)
    i = int(np.searchsorted(cdf, total * percentile / 100.0))
    return min(i + 1, len(hist))


def entropy_threshold(hist: np.ndarray, levels: int = QUANT_LEVELS, stride: int = 16) -> int:
    """The number of bins whose content, squeezed into ``levels`` levels (the rest clipped into the last
    bin), loses the least information (KL divergence of the quantized histogram from the clipped one).
    Candidates every ``stride`` bins from ``levels`` to all of them."""
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= levels or hist.sum() <= 0:
        return n
    best, best_kl = n, np.inf
    for i in range(levels, n + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()  # clipped values land in the last kept bin
        nonzero = p > 0
        # merge the i bins into `levels` groups; spread each group's mass over its non-empty bins
        starts = np.linspace(0, i, levels + 1).round().astype(np.int64)[:-1]
        group = np.repeat(np.arange(levels), np.diff(np.append(starts, i)))
        mass = np.add.reduceat(hist[:i], starts)
        filled = np.add.reduceat(nonzero.astype(np.int64), starts)
        q = np.where(nonzero, (mass / np.maximum(filled, 1))[group], 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        pn, qn = p[nonzero] / ps, q[nonzero] / qs
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = float(np.sum(pn * np.log(pn / np.maximum(qn, 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return best
