"""Database URLs as memspec shows them: the one place that knows where a URL can carry a secret.

A run database URL reaches messages, run.json, exports and logs, so every secret it may carry is masked before it
is shown (`display_url`) and removed from any text that may quote it (`redact`, for drivers' error messages):

- the userinfo password: `postgresql://user:SECRET@host/db` (up to the LAST '@', so an unencoded '@', '/', '?' or
  '#' inside the password is masked with it);
- query parameters whose name says secret (password, passwd, pwd, sslpassword, token, secret, key, api_key,
  credential, signature, ...), matched case-insensitively after %-decoding the name (`?pass%77ord=`);
- libpq keyword/value connection strings: `host=db user=u password='a b'`;
- fragments (`#...`): no driver reads one, so it is masked whole.

Masking more than needed only shortens a message; masking less leaks, so the rules lean to masking.
"""
from __future__ import annotations

import re
from urllib.parse import quote, quote_plus, unquote, unquote_plus

MASK = '***'
# a parameter whose (decoded, lower-case) name contains one of these holds a secret
_SECRET_NAME = re.compile(r'pass|pwd|secret|token|key|credential|signature|cookie|^sig$', re.I)
# keyword=value pairs of a libpq connection string; a value is 'quoted (\' escapes)' or runs to the next blank
_KEYWORD = re.compile(r"(?P<key>[A-Za-z_][\w.-]*)\s*=\s*(?P<value>'(?:\\.|[^'\\])*'?|[^\s']*)")


def _secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(unquote_plus(name).strip()))


def _split(url: str) -> tuple[str, str | None, str, str | None, str | None]:
    """(scheme://, userinfo or None, rest (host/path), query or None, fragment or None); the userinfo runs to the
    last '@' of the URL, the fragment from the first '#' after it."""
    scheme, _, after = url.partition('://')
    userinfo = None
    if '@' in after:
        userinfo, _, after = after.rpartition('@')
    after, hash_, fragment = after.partition('#')
    rest, q, query = after.partition('?')
    return scheme + '://', userinfo, rest, query if q else None, fragment if hash_ else None


def _mask_pairs(text: str) -> str:
    """`a=1&password=x;token=y` with every secret value masked (separators & and ; kept)."""
    parts = re.split(r'([&;])', text)
    for i, part in enumerate(parts):
        name, eq, value = part.partition('=')
        if eq and (_secret_name(name) or _inner(value)):  # options=-c%20password%3Dx hides one inside
            parts[i] = f'{name}={MASK}'
    return ''.join(parts)


def _inner(value: str) -> list[str]:
    """The secrets of keyword=value pairs inside a (%-decoded) parameter value."""
    return [m['value'].strip("'") for m in _KEYWORD.finditer(unquote_plus(value)) if _secret_name(m['key'])]


def _mask_keywords(text: str) -> str:
    return _KEYWORD.sub(lambda m: f"{m['key']}={MASK}" if _secret_name(m['key']) else m[0], text)


def display_url(url: str) -> str:
    """The URL with every secret it may carry replaced by *** (see the module doc): safe to print and record."""
    url = str(url)
    if '://' not in url:  # a libpq keyword/value string, or a bare path (nothing to mask there)
        return _mask_keywords(url)
    scheme, userinfo, rest, query, fragment = _split(url)
    out = scheme
    if userinfo is not None:
        user, colon, _ = userinfo.partition(':')
        out += f'{user}:{MASK}@' if colon else f'{user}@'
    out += _mask_keywords(rest) if '=' in rest else rest
    if query is not None:
        out += '?' + _mask_pairs(query)
    if fragment is not None:
        out += '#' + MASK
    return out.replace('+psycopg2', '')


def _values(url: str) -> list[str]:
    """Every secret value of `url` as written in it."""
    url = str(url)
    if '://' not in url:
        return [m['value'].strip("'") for m in _KEYWORD.finditer(url) if _secret_name(m['key'])]
    _, userinfo, rest, query, fragment = _split(url)
    found = []
    if userinfo is not None and ':' in userinfo:
        found.append(userinfo.partition(':')[2])
    found += [m['value'].strip("'") for m in _KEYWORD.finditer(rest) if _secret_name(m['key'])]
    for part in re.split(r'[&;]', query or ''):
        name, eq, value = part.partition('=')
        if eq and _secret_name(name):
            found.append(value)
        elif eq and _inner(value):
            found += [value, *_inner(value)]
    if fragment:
        found.append(fragment)
    return found


def url_secrets(url: str) -> list[str]:
    """The secrets of `url` in every form a message may quote them (raw, %-decoded, %-encoded), longest first."""
    values = _values(url)
    values += [unquote_plus(v) for v in values]
    # a password with an '@', '/', '?' or '#' is cut there by URL parsers, whose messages then quote the pieces (as
    # a host name, a database): those pieces are secrets too (short ones would mask ordinary words)
    values += [piece for v in values for piece in re.split(r'[@/?#:]', v) if len(piece) >= 4]
    forms = set()
    for v in values:
        forms |= {v, unquote(v), unquote_plus(v), quote(v, safe=''), quote_plus(v, safe=''), quote(unquote(v), safe='')}
    return sorted(forms - {''}, key=len, reverse=True)


def redact(text: str, url: str | None) -> str:
    """`text` (a driver's error message, a traceback) with every secret of `url` replaced by ***, and any URL-shaped
    secret it quotes itself masked too."""
    text = str(text)
    for secret in url_secrets(url) if url else []:
        text = text.replace(secret, MASK)
    return text
