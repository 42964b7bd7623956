"""Fast tests, no Docker: a policy's image extension, its extra certificate authorities, and the warning
about uncommitted changes in the host repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent_sandbox.backend.images import _extension_dockerfile, extended_tag
from agent_sandbox.config.policy import ImageExtension, ca_bundle, load_policy
from agent_sandbox.errors import UsageError
from agent_sandbox.git.checkout import open_repo
from agent_sandbox.run.runner import _dirty_warning

from .conftest import git


def make_ca(tmp_path: Path, name: str = "company-ca") -> Path:
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
        ],
        check=True,
        capture_output=True,
    )
    return cert


def write_policy(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_ca_certificates_resolve_relative_to_the_policy_file(tmp_path) -> None:
    (tmp_path / "certs").mkdir()
    cert = make_ca(tmp_path / "certs")
    pol_dir = tmp_path / "policies"
    pol_dir.mkdir()
    p = write_policy(pol_dir / "corp.yaml", {"egress": {"ca_certificates": ["../certs/company-ca.pem"]}})
    policy, _ = load_policy(str(p))
    assert policy.egress.ca_certificates == [str(cert.resolve())]
    bundle = ca_bundle(policy)
    assert bundle == cert.read_text().rstrip("\n") + "\n" and bundle.count("BEGIN CERTIFICATE") == 1


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read 'ca.pem'"),
        ("not a certificate\n", "'ca.pem' holds no PEM certificate"),
        (
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "'ca.pem' is not a valid certificate",
        ),
    ],
)
def test_bad_ca_certificates_are_refused_when_the_policy_loads(tmp_path, content, fragment) -> None:
    if content is not None:
        (tmp_path / "ca.pem").write_text(content)
    p = write_policy(tmp_path / "p.yaml", {"egress": {"ca_certificates": ["ca.pem"]}})
    with pytest.raises(UsageError) as err:
        load_policy(str(p))
    assert "egress.ca_certificates" in err.value.message and fragment in err.value.message


def test_no_ca_certificates_means_no_bundle() -> None:
    policy, _ = load_policy("default")
    assert ca_bundle(policy) == ""


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        ({"packages": ["libpq-dev; rm -rf /"]}, "is not a Debian package name"),
        ({"packages": ["Bad_Name"]}, "is not a Debian package name"),
        ({"setup": ["  "]}, "a setup command is empty"),
        ({"package": ["jq"]}, "image.package: unknown key"),
    ],
)
def test_bad_image_extensions_are_refused(tmp_path, image, fragment) -> None:
    p = write_policy(tmp_path / "p.yaml", {"image": image})
    with pytest.raises(UsageError) as err:
        load_policy(str(p))
    assert fragment in err.value.message


def test_extension_dockerfile_and_its_tag() -> None:
    ext = ImageExtension(packages=["postgresql-client", "libpq-dev=15.*"], setup=["pip install 'a b'", "echo $HOME"])
    df = _extension_dockerfile(ext, with_ca=True)
    lines = df.splitlines()
    assert lines[:4] == ["ARG BASE", "FROM ${BASE}", "USER root", "ENV HOME=/root"]
    # The CA is trusted before any package or setup command reaches the network.
    assert lines.index("RUN update-ca-certificates >/dev/null") < next(i for i, x in enumerate(lines) if "apt-get" in x)
    assert "--no-install-recommends postgresql-client libpq-dev=15.*" in df
    # Each setup command is one exec-form RUN: quoting survives, and a failure names the command.
    assert 'RUN ["/bin/bash", "-euo", "pipefail", "-c", "pip install \'a b\'"]' in lines
    assert lines[-2:] == ["ENV HOME=/home/agent", "USER agent"]
    # The tag follows every input: the image below, the extension, the CA's contents.
    t = extended_tag("ns/agent:1", ext, "")
    assert t == extended_tag("ns/agent:1", ext, "") and t.split(":")[0].endswith("/agent-custom")
    assert (
        len(
            {
                t,
                extended_tag("ns/agent:2", ext, ""),
                extended_tag("ns/agent:1", ext, "CA"),
                extended_tag("ns/agent:1", ImageExtension(packages=["jq"]), ""),
            }
        )
        == 4
    )
    assert ImageExtension().empty and not ext.empty


def test_dirty_host_repository_is_named(make_repo) -> None:
    repo = make_repo()
    host = open_repo(repo)
    head = git(repo, "rev-parse", "HEAD")
    assert _dirty_warning(host, "HEAD", head) == []
    (repo / "a.py").write_text("x = 2\n")
    (repo / "new.txt").write_text("untracked\n")
    (warning,) = _dirty_warning(host, "HEAD", head)
    assert "uncommitted changes (2 path(s))" in warning and head[:12] in warning and "--base" in warning
    # An explicit base is a deliberate choice: the working tree does not matter then.
    assert _dirty_warning(host, "main", head) == []
