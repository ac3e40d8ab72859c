"""Paging that always ends: one guard for every paginated read of every connector.

A vendor can page forever: an OData ``@odata.nextLink`` that changes on every page while the
rows repeat (or stay empty), a Zoho ``page_token`` that comes back again and again. A read that
trusts the links loops until killed (seen: 210,000 requests in 90 seconds). So a read ends with
a clear :class:`PagingError` when

- a page adds nothing new: every key on it was seen already in this read (an empty page that
  still promises more counts too), or
- the next link or token repeats one already followed in this read, or
- the read reaches the connection's ceiling of pages (``max_pages_per_read``; generous, so
  only a runaway reaches it).

Keys are remembered as their hashes (about 60 bytes a record), never the records.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shared.failures import PermanentError

DEFAULT_MAX_PAGES = 100_000
MAX_PAGES_LIMIT = 10_000_000


class PagingError(PermanentError):
    """A paginated read that would not end: a loop, or the page ceiling reached."""


class PageGuard:
    """Watches one read, page by page. Call :meth:`page` with the keys of every page and the
    link or token that leads to the next one (None at the end)."""

    def __init__(
        self,
        connection: str,
        entity: str,
        *,
        max_pages: int = DEFAULT_MAX_PAGES,
        what: str = "read",
        setting: str = "max_pages_per_read",
    ) -> None:
        self.connection = connection
        self.entity = entity
        self.max_pages = max_pages
        self.what = what
        self.setting = setting
        self.pages = 0
        self._keys: set[int] = set()
        self._links: set[str] = set()

    def _error(self, happened: str, code: str) -> PagingError:
        return PagingError(
            f"connection {self.connection!r}, {self.entity}: {self.what} stopped after"
            f" {self.pages} pages: {happened}",
            code=code,
        )

    def page(self, keys: Iterable[Any], next_link: str | None) -> None:
        """Account for one page and the link to the next (None at the end); raises
        :class:`PagingError` when the read must stop."""
        count, new = self.add(keys)
        if next_link is not None:
            self.follow(next_link, count=count, new=new)

    def add(self, keys: Iterable[Any]) -> tuple[int, int]:
        """Count one page: (records on it, records not seen before in this read)."""
        self.pages += 1
        before = len(self._keys)
        count = 0
        for key in keys:
            self._keys.add(hash(key))
            count += 1
        return count, len(self._keys) - before

    def follow(self, next_link: str, *, count: int, new: int) -> None:
        """The read is about to follow ``next_link`` after pages that held ``count`` records,
        ``new`` of them not seen before; raises :class:`PagingError` when it must not."""
        if new == 0:
            happened = (
                f"a page of {count} records that were all read already"
                if count
                else "an empty page"
            )
            raise self._error(
                f"{happened} still points to a next page; the service pages in a loop",
                "PAGING_LOOP",
            )
        if next_link in self._links:
            raise self._error(
                "the next page link repeats one already followed; the service pages in a loop",
                "PAGING_LOOP",
            )
        self._links.add(next_link)
        if self.pages >= self.max_pages:
            raise self._error(
                f"the ceiling of {self.max_pages} pages is reached and the service still"
                f" promises more; raise {self.setting} of the connection if the data is"
                " really that large",
                "PAGE_LIMIT",
            )
