"""A compact exact set of strings: the custom ids of an upload being validated."""

from __future__ import annotations

from array import array


class IdSet:
    """An exact set of strings (the custom ids seen) in about 30 bytes each, where a ``set``
    of ``str`` takes about 100 (a 100,000-line file: 3 MiB instead of 9.7). The strings are
    stored UTF-8 encoded end to end in one ``bytearray``; an open-addressing table (linear
    probing, at most half full) holds their numbers."""

    __slots__ = ("_blob", "_ends", "_mask", "_slots")

    def __init__(self) -> None:
        self._blob = bytearray()
        self._ends = array("Q", [0])  # string k (1-based) is blob[ends[k - 1]:ends[k]]
        self._mask = 1023
        self._slots = array("I", bytes(4 * (self._mask + 1)))  # 0: free, else k

    def __len__(self) -> int:
        return len(self._ends) - 1

    def _slot(self, item: str, h: int) -> int:
        """The slot that holds ``item``, else the free slot where it goes."""
        data = item.encode("utf-8", "surrogatepass")
        blob, ends, mask, slots = self._blob, self._ends, self._mask, self._slots
        i = h & mask
        k = slots[i]
        while k and blob[ends[k - 1] : ends[k]] != data:
            i = (i + 1) & mask
            k = slots[i]
        return i

    def __contains__(self, item: str) -> bool:
        return self._slots[self._slot(item, hash(item))] != 0

    def add(self, item: str) -> bool:
        """Add ``item``; False (and nothing changes) when it is in the set already."""
        h = hash(item)
        slots = self._slots
        i = h & self._mask
        if slots[i]:  # taken: probe (a free first slot, the common case, costs no call)
            i = self._slot(item, h)
            if slots[i]:
                return False
        blob = self._blob
        blob += item.encode("utf-8", "surrogatepass")
        ends = self._ends
        ends.append(len(blob))
        k = slots[i] = len(ends) - 1
        if k * 2 > self._mask:
            self._grow()
        return True

    def _grow(self) -> None:
        blob, ends = self._blob, self._ends
        mask = self._mask * 4 + 3
        slots = array("I", bytes(4 * (mask + 1)))
        for k in range(1, len(ends)):
            i = hash(blob[ends[k - 1] : ends[k]].decode("utf-8", "surrogatepass")) & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = k
        self._mask, self._slots = mask, slots
