"""The coordinator's side of a site: a mutual-TLS channel to the site's gateway that names
the job on every call, and an admission check that surfaces a refusal before any
computation runs.

A channel from `site_channel` goes where TFF's own channels go, e.g.
``remote_executor_grpc_stub.RemoteExecutorGrpcStub(site_channel(...))``. Call
`admission_check` first: TFF's remote executor retries an unreachable worker forever,
so a site that refuses the TLS handshake would otherwise look like a hang.
Does not import TensorFlow.
"""

from __future__ import annotations

import json

import collections
from collections.abc import Mapping
from typing import Any

import grpc

from shared.errors import UserError
from tff_apps.runtime.worker import GRPC_CHANNEL_OPTIONS
from tff_apps.sites.certs import Credentials
from tff_apps.sites.gateway import JOB_METADATA
from tff_apps.sites.messages import SERVICE, cardinality_request, pb
from tff_apps.sites.policy import Job, parse_job


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _JobMetadata(grpc.UnaryUnaryClientInterceptor):
    """Adds the job descriptor to every call (the executor service is unary only)."""

    def __init__(self, job_json: str) -> None:
        self._pair = (JOB_METADATA, job_json)

    def intercept_unary_unary(self, continuation, details, request):
        metadata = [*(details.metadata or ()), self._pair]
        return continuation(
            _CallDetails(details.method, details.timeout, metadata, details.credentials,
                         details.wait_for_ready, details.compression),
            request,
        )


def _host(address: str) -> str:
    host, _, _ = address.rpartition(":")
    return host.strip("[]")


def site_channel(
    address: str,
    credentials: Credentials,
    job: Job | Mapping[str, Any],
    *,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to the gateway at ``address`` (host:port) carrying ``job`` on every call.

    The gateway's certificate is checked against ``credentials.ca`` and must name the host
    of ``address``; give ``server_name`` (the site's name, as in its certificate) when
    the site is reached under another name or an IP address its certificate does not list.
    """
    if not _host(address) or not address.rpartition(":")[2].isdigit():
        raise UserError(f"site address {address!r}: expected HOST:PORT")
    options = list(GRPC_CHANNEL_OPTIONS)
    if server_name and server_name != _host(address):
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = grpc.secure_channel(address, credentials.channel(), options)
    return grpc.intercept_channel(channel, _JobMetadata(parse_job(job).to_json()))


def _unary(channel: grpc.Channel, method: str, response_type: Any):
    return channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response_type.FromString,
    )


def admission_check(channel: grpc.Channel, *, site: str, timeout: float = 30.0) -> dict | None:
    """Asks the site for an executor and gives it back: the cheapest call the worker accepts.

    A refusal (policy, descriptor, certificate, nothing listening, the site's own privacy
    budget) is a one-line UserError naming the site, raised before any computation is sent.
    Returns the site's budget after this job when it keeps one (`site_budget`), else None.
    """
    try:
        response, call = _unary(channel, "GetExecutor", pb.GetExecutorResponse).with_call(
            cardinality_request(), timeout=timeout, wait_for_ready=False
        )
        _unary(channel, "DisposeExecutor", pb.DisposeExecutorResponse)(
            pb.DisposeExecutorRequest(executor=response.executor), timeout=timeout
        )
    except grpc.RpcError as err:
        raise UserError(_admission_message(site, err, timeout)) from None
    budget = dict(call.trailing_metadata() or ()).get("tff-apps-site-budget")
    return json.loads(budget) if budget else None


def _admission_message(site: str, err: grpc.RpcError, timeout: float) -> str:
    code = err.code()
    details = (err.details() or "").splitlines()[0] if err.details() else ""
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
        return details  # the gateway's own line, which names the site and the rule
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"site {site}: no mutual-TLS connection ({details}); check the address, that the site "
            "serves (tff-apps site serve), and that both certificates come from the same CA"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"site {site}: no answer within {timeout:g} s"
    return f"site {site}: the admission call failed with {code.name}: {details}"

