"""A fake Danbooru on 127.0.0.1 that speaks its JSON API (tags, aliases, implications, wiki
pages), records every request it receives and can be scripted to fail. Tests import it from
fake_servers.py, which re-exports `FakeDanbooru`, `CHALLENGE` and `NOT_FOUND`.
"""
from __future__ import annotations

import re
import threading
from typing import Callable, Dict, List, Optional

from fake_http import FakeServer, Recorded


NOT_FOUND = {"success": False, "error": "ActiveRecord::RecordNotFound", "message": "That record was not found.",
             "backtrace": []}
CHALLENGE = (403, "<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>Enable JavaScript and "
             "cookies to continue</body></html>", "text/html; charset=UTF-8", {"cf-mitigated": "challenge"})
"""What Cloudflare in front of Danbooru answers a challenged client (an `override` result)."""


class FakeDanbooru(FakeServer):
    """`/tags.json` (with the wiki page nested through `only=`), `/tag_aliases.json`,
    `/tag_implications.json`, `/wiki_pages.json` and `/wiki_pages/<title>.json`, like
    danbooru.donmai.us.

    `wiki` maps a title to its DText body; `tags` maps a name to its `category` and
    `post_count` (a tag with a wiki page exists as a general tag unless given here);
    `aliases` maps an antecedent to its consequent, `implications` an antecedent to its
    consequents (active ones); `other_names` a title to its page's other names; `deleted`
    holds deleted page titles. `override(path) -> (status, body, content_type[, headers]) | None`
    injects faults (`CHALLENGE`: Cloudflare's); `silent = True` makes it accept requests and
    never answer them.
    """

    def __init__(self, wiki: Optional[Dict[str, str]] = None, tags: Optional[Dict[str, dict]] = None):
        super().__init__()
        self.wiki = dict(wiki or {})
        self.deleted: set = set()
        self.tags = dict(tags or {})
        self.aliases: Dict[str, str] = {}
        self.implications: Dict[str, List[str]] = {}
        self.other_names: Dict[str, List[str]] = {}
        self.override: Callable[[str], Optional[tuple]] = lambda path: None
        self.silent = False
        self._released = threading.Event()

    def stop(self) -> None:
        self._released.set()
        super().stop()

    def api_requests(self) -> List[Recorded]:
        return [r for r in self.requests if r.path.endswith(".json")]

    def looked_up(self) -> List[str]:
        """Every tag name asked for in `/tags.json` requests, in order, repeats included."""
        names = []
        for r in self.requests:
            if r.path == "/tags.json":
                names += (r.query.get("search[name_comma]") or r.query.get("search[name]") or [""])[0].split(",")
        return names

    def asked(self, path: str) -> List[List[str]]:
        """The names of each request to `path` (`/tag_implications.json`…), by antecedent or name."""
        return [(r.query.get("search[antecedent_name_comma]") or r.query.get("search[name_comma]") or [""])[0]
                .split(",") for r in self.requests if r.path == path]

    def _page(self, title: str) -> dict:
        return {"id": abs(hash(title)) % 100000, "title": title, "body": self.wiki[title],
                "other_names": list(self.other_names.get(title, [])),
                "is_locked": False, "is_deleted": title in self.deleted,
                "created_at": "2020-01-01T00:00:00.000-05:00", "updated_at": "2024-01-01T00:00:00.000-05:00"}

    def _tag(self, index: int, name: str, only: str) -> dict:
        row = {"id": index, "name": name, "category": 0, "post_count": 100, "is_deprecated": False,
               "created_at": "2020-01-01T00:00:00.000-05:00", "updated_at": "2024-01-01T00:00:00.000-05:00"}
        if name in self.aliases:  # like Danbooru: an aliased tag stays, emptied of its posts
            row["post_count"] = 0
        row.update(self.tags.get(name, {}))
        if "wiki_page" in only:
            row["wiki_page"] = self._page(name) if name in self.wiki and name not in self.aliases else None
        if only:
            fields = {field.split("[")[0] for field in re.split(r",(?![^\[]*\])", only)}
            row = {key: value for key, value in row.items() if key in fields}
            if isinstance(row.get("wiki_page"), dict):
                nested = re.search(r"wiki_page\[([^\]]*)\]", only)
                if nested:
                    keep = set(nested.group(1).split(","))
                    row["wiki_page"] = {k: v for k, v in row["wiki_page"].items() if k in keep}
        return row

    def _relations(self, first: dict, table: Dict[str, object]) -> list:
        names = first.get("search[antecedent_name_comma]", "").split(",")
        status = first.get("search[status]")
        rows = []
        for name in names:
            found = table.get(name, [])
            for consequent in ([found] if isinstance(found, str) else found):
                rows.append({"id": len(rows), "antecedent_name": name, "consequent_name": consequent,
                             "status": "active"})
        return [row for row in rows if status in (None, row["status"])]

    def handle(self, handler, method, path, query, body) -> None:
        if self.silent:
            self._released.wait()
            return
        injected = self.override(path)
        if injected:
            status, payload, content_type, *headers = injected
            handler.send_body(status, payload, content_type, headers[0] if headers else None)
            return
        first = {key: values[0] for key, values in query.items()}
        only = first.get("only", "")
        if path.startswith("/wiki_pages/") and path.endswith(".json"):
            title = path[len("/wiki_pages/"):-len(".json")].lstrip("~")
            if title in self.wiki:
                handler.send_body(200, self._page(title))
            else:
                handler.send_body(404, NOT_FOUND)
        elif path == "/wiki_pages.json":
            titles = first.get("search[title_comma]", first.get("search[title]", "")).split(",")
            handler.send_body(200, [self._page(t) for t in titles if t in self.wiki])
        elif path == "/tags.json":
            names = first.get("search[name_comma]", first.get("search[name]", "")).split(",")
            known = [name for name in names if name in self.tags or name in self.wiki or name in self.aliases]
            handler.send_body(200, [self._tag(index, name, only) for index, name in enumerate(known)])
        elif path == "/tag_aliases.json":
            handler.send_body(200, self._relations(first, self.aliases))
        elif path == "/tag_implications.json":
            handler.send_body(200, self._relations(first, self.implications))
        else:
            handler.send_body(404, NOT_FOUND)
