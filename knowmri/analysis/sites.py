"""Reading the `sites` finding: the hookable places a method localises a fact to.

A result's `findings["sites"]` lists them best first, each as
`{"site": "blocks.2.mlp.out", "position": 3, "token": " Tower", "score": 0.12, "kind": "mlp"}`:
`site` is a canonical hook site (see `knowmri.hooks`), `position` the token position it acts at,
`score` the method's own measure of it and `kind` a short label of the site's family.
"""

from __future__ import annotations

import re
from typing import Any

_BLOCK_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_WORDS = {"resid_pre": "residual stream entering", "resid_post": "hidden state", "attn.out": "attention output",
          "attn.heads": "attention heads", "mlp.out": "MLP output", "mlp.neurons": "MLP neurons"}


def result_sites(findings: dict[str, Any]) -> list[dict[str, Any]]:
    """The well-formed entries of `findings["sites"]` (a canonical block site and a position), best first."""
    return [s for s in findings.get("sites") or [] if isinstance(s, dict) and site_layer(s.get("site")) is not None
            and isinstance(s.get("position"), int)]


def site_layer(name: Any) -> int | None:
    """The layer of a block site (`blocks.{layer}.<kind>`); None for other names."""
    found = _BLOCK_SITE.match(name) if isinstance(name, str) else None
    return int(found.group(1)) if found else None


def site_kind(site: dict[str, Any]) -> str:
    """The site's `kind` label, or its hook kind (`mlp.out`, ...) when it has none."""
    found = _BLOCK_SITE.match(site["site"])
    return str(site.get("kind") or (found.group(2) if found else site["site"]))


def describe_site(site: dict[str, Any]) -> str:
    """Plain words for a site, e.g. "MLP output of layer 3 at token 4"."""
    found = _BLOCK_SITE.match(site["site"])
    what = _WORDS.get(found.group(2), found.group(2)) if found else site["site"]
    return f"{what} of layer {site_layer(site['site'])} at token {site['position']}"
