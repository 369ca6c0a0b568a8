"""Parallel corpora for tokenizer premiums: Django's human translations (offline) and FLORES-200 (online).

**Django catalogs** (:func:`django_parallel_corpus`, the offline default). Django ships human translations of
its user-facing strings for ~100 locales as compiled gettext catalogs
``django/conf/locale/<ll>/LC_MESSAGES/django.mo`` and ``django/contrib/<app>/locale/<ll>/LC_MESSAGES/
{django,djangojs}.mo``. The corpus is built as follows, deterministically:

1. Django's package directory is found with ``importlib.util.find_spec("django")`` (Django is never
   imported). Every catalog domain (``conf/django``, ``contrib/admin/django``,
   ``contrib/admin/djangojs``, ...) is read for every chosen language with the stdlib ``gettext.GNUTranslations``.
2. The English side is the ``msgid`` (Django's source strings are English; the ``en`` catalog is empty).
   A message with a context (``pgettext``) keeps its context in the key but only its ``msgid`` as text.
3. Skipped: the metadata entry (empty ``msgid``); plural forms (``ngettext`` entries, stored as
   ``(msgid, n)`` keys); messages missing or empty in **any** chosen language (only messages translated in
   all of them are kept). Fuzzy entries never reach a ``.mo`` file (``msgfmt`` drops them; Django's ``.po``
   files carry none).
4. Placeholders are stripped from every side: ``%(name)s``-style and positional printf conversions
   (``%s``, ``%d``, ``%.2f``; ``%%`` becomes ``%``), ``str.format`` fields (``{0}``, ``{name}``) and HTML
   tags; HTML entities are unescaped; brackets and quotes left empty are removed, whitespace is collapsed,
   a space left before punctuation is removed and dangling separators (``- : ; , /``) at either end are
   trimmed. A message whose cleaned text is shorter than ``min_chars`` in any language is
   dropped.
5. The same English text in several domains is kept once (``dedupe=True``: the first domain in sorted
   order wins). Rows are ordered by ``(domain, context, msgid)``.

Language codes are normalised to Django's locale names: ``"pt-br"`` -> ``"pt_BR"``, ``"sr-latn"`` ->
``"sr_Latn"``, ``"zh"``/``"zh-cn"`` -> ``"zh_Hans"``, ``"zh-tw"`` -> ``"zh_Hant"``, ``"no"`` -> ``"nb"``,
``"iw"`` -> ``"he"``, and ``"en"``/``"en-us"`` -> ``"en"`` (the source side). Columns are named by the
normalised codes.

**FLORES-200** (:func:`flores_corpus`) is the production path when a hub is reachable: 1,012 (devtest) or 997
(dev) sentences professionally translated into 200+ languages, via ``datasets.load_dataset``.

Examples:
    >>> ds = django_parallel_corpus(["en", "de", "ja"])     # doctest: +SKIP
    >>> ds.column_names                                      # doctest: +SKIP
    ['key', 'domain', 'en', 'de', 'ja']
"""

from __future__ import annotations

import gettext
import html
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "django_locale_dirs",
    "django_languages",
    "normalize_language",
    "strip_placeholders",
    "django_parallel_corpus",
    "flores_corpus",
    "FLORES_CODES",
]

_ALIASES = {
    "zh": "zh_Hans",
    "zh_CN": "zh_Hans",
    "zh_SG": "zh_Hans",
    "zh_TW": "zh_Hant",
    "zh_HK": "zh_Hant",
    "zh_MO": "zh_Hant",
    "no": "nb",
    "nb_NO": "nb",
    "iw": "he",
    "in": "id",
    "en_US": "en",
}

_PRINTF_NAMED = re.compile(r"%\([^)]*\)[#0\- +]*(?:\d+|\*)?(?:\.(?:\d+|\*))?[hlL]?[diouxXeEfFgGcrsa]")
_PRINTF_POS = re.compile(r"%[#0\- +]*(?:\d+|\*)?(?:\.(?:\d+|\*))?[hlL]?[diouxXeEfFgGcrsa]")
_FORMAT = re.compile(r"\{[^{}\s]*\}")
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_EDGE = re.compile(r"^[\s\-–—:;,/]+|[\s\-–—:;,/]+$")
_WS = re.compile(r"\s+")
_EMPTY_BRACKETS = re.compile(r"[(\[（]\s*[)\]）]|“\s*”|«\s*»|\"\s*\"")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?。、，．！？)\]）])")


def normalize_language(code: str) -> str:
    """Normalise a language code to Django's locale name (``"pt-br"`` -> ``"pt_BR"``; see module docs).

    Args:
        code: A language code (BCP-47 ``ll-RR``/``ll-Ssss`` or POSIX ``ll_RR``), case-insensitive.

    Examples:
        >>> [normalize_language(c) for c in ("pt-br", "sr-latn", "ZH", "zh-TW", "de", "en-US")]
        ['pt_BR', 'sr_Latn', 'zh_Hans', 'zh_Hant', 'de', 'en']
    """
    if not isinstance(code, str) or not code.strip():
        raise ValueError(f"a language code must be a non-empty string, got {code!r}")
    parts = code.strip().replace("-", "_").split("_")
    out = parts[0].lower()
    for p in parts[1:]:
        out += "_" + (p.title() if len(p) == 4 else p.upper() if len(p) == 2 else p.lower())
    return _ALIASES.get(out, out)


def strip_placeholders(text: str) -> str:
    """Remove printf / ``str.format`` placeholders and HTML tags, unescape entities, tidy whitespace.

    Args:
        text: A catalog string.

    Examples:
        >>> strip_placeholders('View <a href="x">release notes</a> for Django %(version)s')
        'View release notes for Django'
        >>> strip_placeholders("%(from)s-%(to)s relationship: {0} %d%% done (%(n)s).")
        'relationship: % done.'
    """
    s = text.replace("%%", "\x00")
    s = _PRINTF_NAMED.sub(" ", s)
    s = _PRINTF_POS.sub(" ", s)
    s = _FORMAT.sub(" ", s)
    s = _TAG.sub(" ", s)
    s = html.unescape(s).replace("\x00", "%")
    s = _EMPTY_BRACKETS.sub(" ", s)
    s = _WS.sub(" ", s)
    s = _SPACE_BEFORE_PUNCT.sub(r"\1", s)
    prev = None
    while prev != s:
        prev, s = s, _EDGE.sub("", s)
    return s


def _django_root() -> Path:
    spec = importlib.util.find_spec("django")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the offline parallel corpus reads Django's translation catalogs: pip install django "
            "(only its locale files are read; Django is not imported)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def django_locale_dirs() -> dict[str, Path]:
    """Catalog domain name -> its ``locale`` directory (``"conf"``, ``"admin"``, ``"auth"``, ...)."""
    root = _django_root()
    out = {"conf": root / "conf" / "locale"}
    contrib = root / "contrib"
    if contrib.is_dir():
        for d in sorted(contrib.iterdir()):
            if (d / "locale").is_dir():
                out[d.name] = d / "locale"
    if not out["conf"].is_dir():
        raise FileNotFoundError(f"Django's locale directory is missing at {out['conf']}: reinstall django")
    return out


def django_languages() -> list[str]:
    """Every language with a compiled core catalog, plus ``"en"`` (the source side), sorted."""
    conf = django_locale_dirs()["conf"]
    langs = {p.parent.parent.name for p in conf.glob("*/LC_MESSAGES/django.mo")}
    return sorted(langs | {"en"})


def _read_catalog(path: Path) -> dict[str, str]:
    """``{context\\x04msgid or msgid: translation}`` of one ``.mo`` file, plurals and metadata skipped.

    Reads the parsed catalog of ``gettext.GNUTranslations`` (its ``_catalog`` mapping, the only way the
    stdlib exposes every entry).
    """
    with open(path, "rb") as f:
        t = gettext.GNUTranslations(f)
    return {k: v for k, v in t._catalog.items() if isinstance(k, str) and k and isinstance(v, str) and v}


def django_parallel_corpus(
    languages: Sequence[str] | None = None,
    *,
    domains: Sequence[str] | None = None,
    include_js: bool = True,
    min_chars: int = 2,
    dedupe: bool = True,
    max_rows: int | None = None,
) -> Any:
    """A ``datasets.Dataset`` of parallel strings from Django's human translations (see module docs).

    Args:
        languages: Language codes (normalised with :func:`normalize_language`); default ``en, de, fr, es,
            ru, zh_Hans, ja, ar, hi``. ``"en"`` is the source side.
        domains: Catalog domains to read (``"conf"``, ``"admin"``, ``"auth"``, ...; default: all).
        include_js: Also read the ``djangojs`` catalogs (admin's JavaScript strings).
        min_chars: Drop a message whose cleaned text is shorter than this in any language.
        dedupe: Keep one row per English text.
        max_rows: Keep the first ``max_rows`` rows (in the deterministic order).

    Returns:
        A ``datasets.Dataset`` with columns ``key`` (``domain:context\\x04msgid``), ``domain`` and one column
        per language (normalised codes, in the order given).

    Raises:
        ImportError: When Django is not installed (names the pip package).
        ValueError: For unknown languages or domains (lists the available ones), or when no message is
            translated in all chosen languages.

    Examples:
        >>> ds = django_parallel_corpus(["en", "de"], domains=["humanize"], max_rows=2)
        >>> ds.column_names, len(ds)
        (['key', 'domain', 'en', 'de'], 2)
    """
    import datasets

    if languages is None:
        languages = ["en", "de", "fr", "es", "ru", "zh_Hans", "ja", "ar", "hi"]
    if isinstance(languages, str):
        languages = [x for x in languages.split(",") if x.strip()]
    langs = []
    for c in languages:
        n = normalize_language(c)
        if n not in langs:
            langs.append(n)
    if not langs:
        raise ValueError("no languages given")
    avail = django_languages()
    missing = [c for c in langs if c not in avail]
    if missing:
        raise ValueError(f"languages not in Django's catalogs: {missing}; available: {', '.join(avail)}")
    dirs = django_locale_dirs()
    if domains is not None:
        bad = [d for d in domains if d not in dirs]
        if bad:
            raise ValueError(f"unknown catalog domains {bad}; available: {', '.join(dirs)}")
        dirs = {d: dirs[d] for d in domains}
    others = [c for c in langs if c != "en"]
    rows: list[tuple[str, str, str, dict[str, str]]] = []
    for dom in sorted(dirs):
        for fname in ("django.mo", "djangojs.mo") if include_js else ("django.mo",):
            cats: dict[str, dict[str, str]] = {}
            for c in others:
                p = dirs[dom] / c / "LC_MESSAGES" / fname
                cats[c] = _read_catalog(p) if p.is_file() else {}
            if others:
                keys = set.intersection(*(set(cats[c]) for c in others))
            else:  # English only: every message that any shipped catalog of this domain translates
                keys = set()
                for p in sorted(dirs[dom].glob(f"*/LC_MESSAGES/{fname}")):
                    keys |= set(_read_catalog(p))
            name = dom if fname == "django.mo" else f"{dom}.js"
            for k in sorted(keys):
                msgid = k.split("\x04", 1)[-1]
                texts = {"en": msgid, **{c: cats[c][k] for c in others}}
                rows.append(
                    (name, k, strip_placeholders(msgid), {c: strip_placeholders(texts[c]) for c in langs})
                )
    seen: set[str] = set()
    out: dict[str, list[str]] = {"key": [], "domain": [], **{c: [] for c in langs}}
    for dom, k, en, texts in sorted(rows, key=lambda r: (r[0], r[1])):
        if any(len(texts[c]) < min_chars for c in langs):
            continue
        if dedupe:
            if en in seen:
                continue
            seen.add(en)
        out["key"].append(f"{dom}:{k}")
        out["domain"].append(dom)
        for c in langs:
            out[c].append(texts[c])
        if max_rows is not None and len(out["key"]) >= max_rows:
            break
    if not out["key"]:
        raise ValueError(
            f"no message is translated in all of {langs} (domains {sorted(dirs)}); choose fewer languages"
        )
    return datasets.Dataset.from_dict(out)


#: A few FLORES-200 codes by Django-style language code (``flores_corpus`` also takes FLORES codes as-is).
FLORES_CODES = {
    "en": "eng_Latn",
    "de": "deu_Latn",
    "fr": "fra_Latn",
    "es": "spa_Latn",
    "ru": "rus_Cyrl",
    "zh_Hans": "cmn_Hans",
    "zh_Hant": "cmn_Hant",
    "ja": "jpn_Jpan",
    "ar": "arb_Arab",
    "hi": "hin_Deva",
    "ko": "kor_Hang",
    "pt": "por_Latn",
    "it": "ita_Latn",
    "tr": "tur_Latn",
    "vi": "vie_Latn",
    "th": "tha_Thai",
    "sw": "swh_Latn",
    "bn": "ben_Beng",
    "ta": "tam_Taml",
    "my": "mya_Mymr",
    "am": "amh_Ethi",
    "uk": "ukr_Cyrl",
    "pl": "pol_Latn",
    "nl": "nld_Latn",
    "fa": "pes_Arab",
    "he": "heb_Hebr",
    "el": "ell_Grek",
    "si": "sin_Sinh",
}


def flores_corpus(
    languages: Sequence[str],
    *,
    split: str = "devtest",
    dataset: str = "openlanguagedata/flores_plus",
    **load_kwargs: Any,
) -> Any:
    """FLORES-200 / FLORES+ parallel sentences through ``datasets.load_dataset`` (needs a hub; not offline).

    One ``load_dataset(dataset, <flores code>, split=split)`` per language (FLORES+ is gated: accept its terms
    on the hub and log in first); rows are aligned on the ``id`` column and returned as one
    ``datasets.Dataset`` with ``id`` and one text column per language, named as given (codes like ``"de"``
    map to FLORES codes through :data:`FLORES_CODES`; FLORES codes such as ``"deu_Latn"`` pass through).

    Args:
        languages: Language codes.
        split: ``"dev"`` (997 sentences) or ``"devtest"`` (1,012).
        dataset: The hub dataset.
        **load_kwargs: Passed to ``datasets.load_dataset`` (``cache_dir``, ``token``, ...).

    Raises:
        RuntimeError: When ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set (use
            :func:`django_parallel_corpus` offline) or the download fails.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes"):
        raise RuntimeError(
            "flores_corpus downloads FLORES from the hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; "
            "use django_parallel_corpus(...) offline, or unset the variable (and log in: FLORES+ is gated)"
        )
    import datasets

    if not languages:
        raise ValueError("no languages given")
    cols: dict[str, list[str]] = {}
    ids: list[Any] | None = None
    for lang in languages:
        code = (
            lang
            if re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", lang)
            else FLORES_CODES.get(normalize_language(lang))
        )
        if code is None:
            raise ValueError(
                f"no FLORES code known for {lang!r}: pass the FLORES code (e.g. 'deu_Latn') instead"
            )
        try:
            ds = datasets.load_dataset(dataset, code, split=split, **load_kwargs)
        except Exception as e:  # network, gating, unknown config
            raise RuntimeError(f"loading {dataset}/{code} ({split}) failed: {e}") from e
        key = "id" if "id" in ds.column_names else None
        text_col = "text" if "text" in ds.column_names else "sentence"
        pairs = sorted(zip(ds[key], ds[text_col], strict=True)) if key else list(enumerate(ds[text_col]))
        if ids is None:
            ids = [p[0] for p in pairs]
        elif [p[0] for p in pairs] != ids:
            raise RuntimeError(f"{code}: sentence ids do not align with {languages[0]}")
        cols[lang] = [p[1] for p in pairs]
    return datasets.Dataset.from_dict({"id": ids, **cols})
