"""A site as a user runs it (`tff-apps site serve`, in its own session: the real worker_binary
in a private network namespace behind the mutual-TLS gateway on loopback), and a coordinator
in this process running TFF computations through `site_channel`.

The site's policy: healthcare only, at most 10 rounds, at least client-level DP, ε <= 8,
results at most 1 MB, callers named "coordinator". The last test stops the site.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import portpicker
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from shared.errors import UserError
from tests.cli import user_environment
from tests.tff_apps.sites.coordinator import Recorder, running_on
from tff_apps.sites import isolation
from tff_apps.sites.certs import Credentials, credentials_from_dir, make_test_pki
from tff_apps.sites.channel import admission_check, site_channel
from tff_apps.sites.messages import SERVICE, cardinality_request

REPO = Path(__file__).resolve().parents[3]
READY_TIMEOUT_S = 30.0
POLICY = """[policy]
apps = ["healthcare"]
max_rounds = 10
require_privacy = "client"
max_epsilon = 8.0
max_value_bytes = 1000000
callers = ["coordinator"]
"""
COORDINATOR_SUBJECT = "CN=coordinator,O=tff-apps test federation"


def serve(base: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tff_apps.cli", "site", "serve", "--data", "data", "--certs", "pki", *args],
        cwd=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**user_environment(), "PYTHONPATH": str(REPO)},
    )


def session_processes(sid: int) -> list[str]:
    """The processes left in session ``sid``, as 'pid comm'."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(f"{stat.parent.name} {text.split('(', 1)[1].rsplit(')', 1)[0]}")
    return found


class Site:
    def __init__(self, base: Path) -> None:
        self.base, self.port = base, portpicker.pick_unused_port()
        self.address = f"127.0.0.1:{self.port}"
        self.audit_path = base / "audit.jsonl"
        self.proc = serve(base, "--port", str(self.port), "--name", "hospital_a", "--policy", "site.toml",
                          "--audit", "audit.jsonl", "--host", "127.0.0.1")
        line = self.proc.stdout.readline()  # blocks until the site announces itself (or exits)
        found = re.match(rf"site hospital_a listening on 127\.0\.0\.1:{self.port} \(worker pid (\d+), in a private", line)
        assert found, line + self.proc.stdout.read() if self.proc.poll() is not None else line
        self.worker_pid = int(found.group(1))

    def audit(self, run_id: str | None = None) -> list[dict]:
        records = [json.loads(line) for line in self.audit_path.read_text().splitlines()]
        return [r for r in records if run_id is None or r["run_id"] == run_id]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("site")
    make_test_pki(base / "pki", ["hospital_a", "hospital_b"])
    (base / "site.toml").write_text(POLICY)
    (base / "data").mkdir()
    running = Site(base)
    yield running
    running.stop()
    for leftover in session_processes(running.proc.pid):  # never leave one behind, even on failure
        os.kill(int(leftover.split()[0]), signal.SIGKILL)


@pytest.fixture(scope="module")
def coordinator(site) -> Credentials:
    return credentials_from_dir(site.base / "pki", "coordinator")


def job(run_id: str, **changes) -> dict:
    return {"app": "healthcare", "run_id": run_id, "rounds": 5, "privacy_level": "client", "epsilon": 4.0,
            "max_value_bytes": 100_000, **changes}


@tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
def total(values):
    return tff.federated_sum(values)


@tff.tensorflow.computation(tff.TensorType(np.float32, [3]))
def doubled(x):
    return x * 2.0


@tff.tensorflow.computation
def a_dataset():
    return tf.data.Dataset.range(5)


@tff.tensorflow.computation
def zeros():
    return tf.zeros([1000], tf.float32)


def test_computations_run_through_the_gateway(site, coordinator) -> None:
    channel = site_channel(site.address, coordinator, job("sum"), server_name="hospital_a")
    admission_check(channel, site="hospital_a", timeout=10)
    with running_on(channel):
        assert total([1, 2, 3, 4]) == 10
        np.testing.assert_array_equal(doubled(np.array([1.0, 2.5, -3.0], np.float32)), [2.0, 5.0, -6.0])
    assert {r["status"] for r in site.audit("sum")} == {"ok"}


def test_the_worker_is_reachable_only_through_the_gateway(site) -> None:
    pid = site.worker_pid
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    interfaces = [line.split(":")[0].strip() for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]]
    assert interfaces == ["lo"]  # its namespace holds nothing a peer could reach
    listening = Path(f"/proc/{pid}/net/tcp6").read_text() + Path(f"/proc/{pid}/net/tcp").read_text()
    assert re.search(r":1F40 \S+ 0A ", listening), listening  # it does listen on 8000, in there
    # The site process itself runs no TensorFlow.
    assert "libtensorflow" not in Path(f"/proc/{site.proc.pid}/maps").read_text()


def test_callers_without_a_certificate_from_the_ca_are_refused_at_connect(site, coordinator, tmp_path) -> None:
    other = make_test_pki(tmp_path / "other", ["x"])
    foreign = Credentials(ca=coordinator.ca, cert=(other / "coordinator.pem").read_bytes(),
                          key=(other / "coordinator.key").read_bytes())
    site_cert = credentials_from_dir(site.base / "pki", "hospital_b")  # the CA's, but a server certificate
    before = len(site.audit())
    for credentials in (foreign, site_cert):
        with pytest.raises(UserError) as err:
            admission_check(site_channel(site.address, credentials, job("intruder")), site="hospital_a", timeout=10)
        assert str(err.value).startswith("site hospital_a: no mutual-TLS connection"), str(err.value)
    without = grpc.secure_channel(site.address, grpc.ssl_channel_credentials(root_certificates=coordinator.ca))
    with pytest.raises(grpc.RpcError) as err:
        without.unary_unary(f"/{SERVICE}/GetExecutor")(cardinality_request().SerializeToString(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(site.audit()) == before  # no call got as far as the gateway's handler


def test_a_job_outside_the_policy_is_refused_before_any_computation(site, coordinator) -> None:
    channel = site_channel(site.address, coordinator, job("too-weak", privacy_level="none", epsilon=None))
    with pytest.raises(UserError) as err:
        admission_check(channel, site="hospital_a", timeout=10)
    assert str(err.value) == "site hospital_a: policy require_privacy = 'client', the job has privacy.level = 'none'"
    with running_on(channel), pytest.raises(grpc.RpcError) as refused:
        total([1, 2])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    records = site.audit("too-weak")
    assert {(r["method"], r["status"]) for r in records} == {("GetExecutor", "refused")}
    assert records[0]["reason"] == str(err.value)


def test_calls_without_a_valid_job_descriptor_are_refused(site, coordinator) -> None:
    secure = grpc.secure_channel(site.address, coordinator.channel())
    call = secure.unary_unary(f"/{SERVICE}/GetExecutor")
    request = cardinality_request().SerializeToString()
    with pytest.raises(grpc.RpcError) as missing:
        call(request, timeout=10)
    assert missing.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert missing.value.details() == (
        "site hospital_a: the call carries no tff-apps-job metadata (connect with tff_apps.sites.channel.site_channel)"
    )
    with pytest.raises(grpc.RpcError) as malformed:
        call(request, timeout=10, metadata=[("tff-apps-job", '{"app": "healthcare"}')])
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert malformed.value.details() == "site hospital_a: job descriptor: no 'run_id'"
    with pytest.raises(grpc.RpcError) as garbage:
        secure.unary_unary(f"/{SERVICE}/CreateValue")(b"\xff\xff", timeout=10,
                                                       metadata=[("tff-apps-job", json.dumps(job("garbage")))])
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert garbage.value.details() == "site hospital_a: the CreateValue message is not a valid TFF executor message"
    assert [(r["method"], r["status"]) for r in site.audit("garbage")] == [("CreateValue", "refused")]


def test_a_dataset_never_leaves_the_site(site, coordinator) -> None:
    with running_on(site_channel(site.address, coordinator, job("dataset"))), pytest.raises(grpc.RpcError) as err:
        a_dataset()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == (
        "site hospital_a: the result contains a sequence (a dataset); only aggregates may leave the site"
    )
    computes = [r for r in site.audit("dataset") if r["method"] == "Compute"]
    assert [(r["status"], r["bytes_out"]) for r in computes] == [("refused", 0)]


def test_a_result_over_the_jobs_byte_limit_is_refused(site, coordinator) -> None:
    with running_on(site_channel(site.address, coordinator, job("big", max_value_bytes=512))):
        with pytest.raises(grpc.RpcError) as err:
            zeros()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    found = re.fullmatch(r"site hospital_a: the result is (\d+) bytes, over the job's max_value_bytes = 512",
                         err.value.details())
    assert found and int(found.group(1)) > 4000, err.value.details()  # 1000 float32


def test_the_audit_log_lists_what_ran_and_who_asked(site, coordinator) -> None:
    recorder = Recorder()
    channel = grpc.intercept_channel(site_channel(site.address, coordinator, job("audited")), recorder)
    with running_on(channel):
        assert total([5, 6]) == 11
    records = site.audit("audited")
    assert [r["method"] for r in records] == [method for method, _, _ in recorder.calls]
    assert {r["caller"] for r in records} == {COORDINATOR_SUBJECT}
    assert {(r["app"], r["status"]) for r in records} == {("healthcare", "ok")}
    hashes = [h for r in records for h in r.get("computation_sha256", [])]
    assert hashes == recorder.computation_hashes() and len(hashes) == 1
    assert [(r["bytes_in"], r["bytes_out"]) for r in records] == [
        (request.ByteSize(), response.ByteSize()) for _, request, response in recorder.calls
    ]
    assert next(r["bytes_out"] for r in records if r["method"] == "Compute") > 0


def test_mistakes_in_serve_are_one_line_and_leave_no_process(site) -> None:
    cases = {
        ("--port", str(site.port), "--name", "hospital_a", "--audit", "other.jsonl"):
            f"error: site serve --port: cannot listen on [::]:{site.port}",
        ("--port", "7", "--name", "hospital_c"): "error: site hospital_c --certs: pki/hospital_c.pem does not exist",
        ("--port", "0", "--name", "hospital_a"): "error: site serve --port 0: expected a port number in 1..65535",
    }
    for args, expected in cases.items():
        proc = serve(site.base, *args)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2 and out.startswith(expected) and len(out.splitlines()) == 1, out
        assert session_processes(proc.pid) == []


def test_isolation_that_the_machine_refuses_is_a_one_line_error(monkeypatch, tmp_path) -> None:
    class NoNamespaces:
        def unshare(self, flags: int) -> int:
            return -1

    monkeypatch.setattr(isolation, "_libc", NoNamespaces)
    monkeypatch.setattr(isolation.ctypes, "get_errno", lambda: 1)  # EPERM
    with pytest.raises(UserError) as err:
        isolation.start_site_worker(tmp_path, "netns")
    assert str(err.value).startswith(
        "site serve --isolation netns: cannot create a network namespace for the worker (Operation not permitted)"
    )
    assert os.readlink("/proc/thread-self/ns/net") == os.readlink("/proc/self/ns/net")


def test_sigterm_stops_the_site_and_leaves_no_process(site) -> None:
    assert site.stop() == 0
    deadline = time.monotonic() + 5
    while session_processes(site.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session_processes(site.proc.pid) == []
    assert not Path(f"/proc/{site.worker_pid}").exists()
