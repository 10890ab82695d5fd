"""One exception hierarchy for the whole daemon.

Every error a user can see carries a one-line message that names what is
wrong; the CLI prints ``str(exc)`` and never a traceback (except at debug).
"""

from __future__ import annotations

import errno as _errno
import os as _os


class MptcpdError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(MptcpdError):
    """A configuration problem: one or more ``PATH:LINE: key: problem`` lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class PluginError(MptcpdError):
    """A plugin could not be loaded or broke its contract."""


class ControlError(MptcpdError):
    """The control socket could not be reached or answered with an error."""


class NetlinkError(MptcpdError):
    """Netlink transport problem (not a refusal by the kernel)."""


class FamilyMissing(NetlinkError):
    """The ``mptcp_pm`` generic netlink family is not registered (no MPTCP)."""


class KernelError(MptcpdError):
    """The kernel refused a command.

    ``errno`` is the kernel's error code, ``detail`` its extended-ack string
    (``"limit greater than maximum (8)"``), which makes the best message.
    """

    #: errno values this class stands for, used by :func:`kernel_error`.
    codes: tuple[int, ...] = ()
    summary = "kernel refused the request"
    endpoint_specific = False

    def __init__(self, code: int, detail: str = "", command: str = "") -> None:
        self.errno = code
        self.detail = detail
        self.command = command
        # Endpoint-specific summaries fit endpoint commands only; a route or a
        # dump that fails with EEXIST / EBUSY gets the plain errno text.
        text = self.summary
        if self.endpoint_specific and command and "endpoint" not in command:
            text = _os.strerror(code).lower()
        if command:
            text = f"{command}: {text}"
        reason = detail or _errno.errorcode.get(code, str(code))
        super().__init__(f"{text} ({reason})")


class EndpointExists(KernelError):
    endpoint_specific = True
    codes = (_errno.EEXIST,)
    summary = "endpoint already exists"


class EndpointIdBusy(KernelError):
    endpoint_specific = True
    codes = (_errno.EBUSY,)
    summary = "endpoint id already in use"


class NoSuchEndpoint(KernelError):
    endpoint_specific = True
    summary = "no such endpoint"


class EndpointTableFull(KernelError):
    endpoint_specific = True
    codes = (_errno.ERANGE,)
    summary = "endpoint table full (the in-kernel path manager holds 8 per namespace)"


class InvalidArgument(KernelError):
    codes = (_errno.EINVAL,)
    summary = "invalid argument"


class PermissionDenied(KernelError):
    codes = (_errno.EPERM, _errno.EACCES)
    summary = "permission denied (CAP_NET_ADMIN is needed in this network namespace)"


class MptcpDisabled(KernelError):
    codes = (_errno.ENOPROTOOPT, _errno.EPROTONOSUPPORT)
    summary = "MPTCP is disabled (net.mptcp.enabled = 0)"


class NotConnected(KernelError):
    codes = (_errno.ENOTCONN,)
    summary = "connection not ready (no ESTABLISHED yet)"


class NoSuchSubflow(KernelError):
    codes = (_errno.ESRCH,)
    summary = "no such subflow"


class NoSuchObject(KernelError):
    codes = (_errno.ENOENT, _errno.ENODEV)
    summary = "no such object"


class AddressNotAvailable(KernelError):
    codes = (_errno.EADDRNOTAVAIL,)
    summary = "address not configured on any interface"


_BY_CODE: dict[int, type[KernelError]] = {}
for _cls in (
    EndpointExists,
    EndpointIdBusy,
    EndpointTableFull,
    InvalidArgument,
    PermissionDenied,
    MptcpDisabled,
    NotConnected,
    NoSuchSubflow,
    NoSuchObject,
    AddressNotAvailable,
):
    for _code in _cls.codes:
        _BY_CODE[_code] = _cls

_NOT_FOUND_HINTS = ("not found", "address not found", "no such", "lookup")


def kernel_error(code: int, detail: str = "", command: str = "") -> KernelError:
    """Map a kernel errno (+ extended ack) to the most specific exception.

    The kernel answers EINVAL, not ENOENT, for a missing endpoint id; the
    extended ack ("address not found") is what tells the two apart.
    """
    code = abs(code)
    if code == _errno.EINVAL and any(h in detail.lower() for h in _NOT_FOUND_HINTS):
        return NoSuchEndpoint(code, detail, command)
    return _BY_CODE.get(code, KernelError)(code, detail, command)
