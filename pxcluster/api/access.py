"""Who may reach the REST API and with what: the token files, the listen address and the rule
that ties them (a listener off loopback needs the admin token unless --api-insecure).

`cluster join` checks these before it touches a disk, and the node daemon applies the same
functions when it starts the API, so a node built from a NodeConfig directly gets them too."""

from __future__ import annotations

from dataclasses import dataclass

from pxcluster.errors import PxcError
from pxcluster.inputs import ip_address, is_loopback

MAX_TOKEN = 4096  # bytes: a token file is a secret of a few dozen bytes, not /dev/zero
DEFAULT_API_ADDRESS = "127.0.0.1"


class ApiAccessError(PxcError):
    """A token file or listen address the API cannot safely start with."""


@dataclass(frozen=True)
class Tokens:
    admin: str | None = None  # every call
    read: str | None = None  # GET/HEAD only

    @property
    def any(self) -> bool:
        return bool(self.admin or self.read)


def read_token_file(path: str, option: str) -> str | None:
    """The token in `path`, None when no file is named. An empty file is refused: taking it
    as "no token" would silently turn authentication off."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN + 1)
    except OSError as e:
        raise ApiAccessError(f"cannot read {option} {path}: {e.strerror}") from None
    if len(raw) > MAX_TOKEN:
        raise ApiAccessError(f"{option} {path}: over {MAX_TOKEN} bytes, not a token file")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ApiAccessError(f"{option} {path}: the token must be ASCII") from None
    if not token:
        raise ApiAccessError(
            f"{option} {path} is empty: put the token in it (an empty file would leave the API "
            "open)"
        )
    # It travels in an Authorization header: printable, no spaces or control characters.
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ApiAccessError(
            f"{option} {path}: the token must be one word of printable ASCII characters"
        )
    return token


def read_tokens(admin_file: str, read_file: str) -> Tokens:
    tokens = Tokens(
        read_token_file(admin_file, "--api-token-file"),
        read_token_file(read_file, "--api-read-token-file"),
    )
    if tokens.admin is not None and tokens.admin == tokens.read:
        raise ApiAccessError(
            "--api-token-file and --api-read-token-file hold the same token: the read-only "
            "token must differ from the admin one"
        )
    return tokens


def listen_address(address: str, api_address: str) -> str:
    """--api-address if given, else --address when it is loopback, else 127.0.0.1: the API
    is never reachable from other hosts unless asked for."""
    if api_address:
        try:
            return ip_address(api_address, "--api-address")
        except PxcError as e:
            raise ApiAccessError(str(e)) from None
    return address if is_loopback(address) else DEFAULT_API_ADDRESS


def check_exposure(address: str, tokens: Tokens, insecure: bool) -> None:
    if is_loopback(address) or tokens.admin is not None or insecure:
        return
    raise ApiAccessError(
        f"the REST API would listen on {address}, off loopback, without an admin token: "
        "give --api-token-file (or --api-insecure to accept an open API)"
    )
