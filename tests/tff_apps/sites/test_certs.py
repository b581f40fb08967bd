"""tff_apps.sites.certs: the test PKI's files, names and purposes, and one-line refusals of
files that do not belong together."""

from __future__ import annotations

import datetime
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from shared.errors import UserError
from tff_apps.sites.certs import common_name, credentials_from_dir, load_credentials, make_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki") / "certs", ["hospital_a", "hospital_b"], days=7)


def cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_and_key_permissions(pki) -> None:
    names = ["ca", "coordinator", "hospital_a", "hospital_b"]
    assert sorted(p.name for p in pki.iterdir()) == sorted(f"{n}.{ext}" for n in names for ext in ("pem", "key"))
    for name in names:
        assert stat.S_IMODE((pki / f"{name}.key").stat().st_mode) == 0o600, name


def test_site_certificate_names_and_purpose(pki) -> None:
    site = cert(pki / "hospital_a.pem")
    sans = site.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["hospital_a", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(site.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    site.verify_directly_issued_by(cert(pki / "ca.pem"))
    assert site.not_valid_after_utc - site.not_valid_before_utc == datetime.timedelta(days=7)
    # Backdated a few minutes, for a peer whose clock is a little behind.
    assert datetime.datetime.now(datetime.timezone.utc) - site.not_valid_before_utc > datetime.timedelta(minutes=4)


def test_coordinator_certificate_is_a_client_one(pki) -> None:
    coordinator = cert(pki / "coordinator.pem")
    assert list(coordinator.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert common_name((pki / "coordinator.pem").read_bytes()) == "coordinator"
    ca = cert(pki / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_load_credentials_reads_a_matching_set(pki) -> None:
    creds = credentials_from_dir(pki, "hospital_b")
    assert creds.cert == (pki / "hospital_b.pem").read_bytes() and creds.ca == (pki / "ca.pem").read_bytes()


def test_mismatched_or_foreign_files_are_one_line_errors(pki, tmp_path) -> None:
    other = make_test_pki(tmp_path / "other", ["x"])
    cases = {
        (pki / "ca.pem", pki / "hospital_a.pem", pki / "hospital_b.key"): "is not the key of",
        (pki / "ca.pem", other / "x.pem", other / "x.key"): "was not signed by the CA",
        (pki / "ca.pem", pki / "nobody.pem", pki / "hospital_a.key"): "does not exist",
        (pki / "ca.pem", pki / "hospital_a.key", pki / "hospital_a.key"): "is not a PEM certificate",
    }
    for paths, expected in cases.items():
        with pytest.raises(UserError) as err:
            load_credentials(*paths)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("names, expected", [
    ([], "expected at least one site name"),
    (["bad name"], "'bad name' is not a site name"),
    (["coordinator"], "'coordinator' is reserved"),
    (["a", "a"], "'a' is listed twice"),
])
def test_bad_site_names(tmp_path, names, expected) -> None:
    with pytest.raises(UserError, match=expected):
        make_test_pki(tmp_path / "pki", names)
    assert not (tmp_path / "pki").exists()


def test_an_existing_ca_is_never_overwritten(pki) -> None:
    before = (pki / "ca.pem").read_bytes()
    with pytest.raises(UserError, match="exists and is not empty"):
        make_test_pki(pki, ["hospital_a"])
    assert (pki / "ca.pem").read_bytes() == before
    assert [p.name for p in pki.parent.iterdir()] == ["certs"]  # no staging folder left


def test_site_certs_command(tmp_path, capsys) -> None:
    from tff_apps.cli import main

    assert main(["site", "certs", "--out", str(tmp_path / "pki"), "--sites", "a,b"]) == 0
    assert sorted(p.name for p in (tmp_path / "pki").glob("*.pem")) == ["a.pem", "b.pem", "ca.pem", "coordinator.pem"]
    capsys.readouterr()
    assert main(["site", "certs", "--out", str(tmp_path / "pki"), "--sites", "c"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: site certs --out {tmp_path / 'pki'}: the folder exists and is not empty; choose a new folder\n"
    assert main(["site", "certs", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: tff-apps site certs: the following arguments are required: --sites")
