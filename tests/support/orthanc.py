"""Orthanc (Debian package ``orthanc``) as the PACS in tests: DICOM and REST on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

from tests.support.node import Node
from tests.support.peers import dcmtk_env, free_port, missing, wait_for

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    def __init__(
        self,
        workdir: Path,
        modalities: dict[str, tuple[str, str, int]],
        *,
        dicomweb_servers: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """*dicomweb_servers* switches Orthanc's DICOMweb plugin on (its server at
        ``/dicom-web/``) with these ``DicomWeb.Servers`` entries for its client."""
        binary = next((b for b in ORTHANC_BINARIES if os.access(b, os.X_OK)), None)
        if binary is None:
            missing("Orthanc", "apt-get install orthanc")
        self.binary = str(binary)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = free_port(), free_port()
        self.ae_title = "ORTHANC"
        config = {
            "Name": "triage-node-test",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {name: list(value) for name, value in modalities.items()},
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "OverwriteInstances": True,
            "SyncStorageArea": True,
            "Plugins": [],
        }
        if dicomweb_servers is not None:
            if not DICOMWEB_PLUGIN.is_file():
                missing("Orthanc's DICOMweb plugin", "apt-get install orthanc-dicomweb")
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": dicomweb_servers,
            }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen[bytes] | None = None
        self.log: BinaryIO | None = None

    def start(self) -> Orthanc:
        self.log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [self.binary, str(self.config_path)],
            stdout=self.log,
            stderr=self.log,
            env=dcmtk_env(),
        )
        wait_for(self._answers, 30, what="Orthanc to answer on its REST port")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.process = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def _answers(self) -> bool:
        try:
            self.get("/system")
        except (urllib.error.URLError, ConnectionError, OSError):
            return False
        return True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())

    def post(self, path: str, body: bytes | dict[str, Any] | list[Any] | str) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            text = response.read()
        return json.loads(text) if text else None

    def upload(self, path: Path) -> str:
        """Store a file through the REST API; returns Orthanc's study id."""
        return str(self.post("/instances", path.read_bytes())["ParentStudy"])

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def stow_study(self, server: str, study_id: str) -> Any:
        """Send the study by STOW-RS to a ``DicomWeb.Servers`` entry (Orthanc's own client)."""
        return self.post(f"/dicom-web/servers/{server}/stow", {"Resources": [study_id]})

    def send_study(self, modality: str, study_id: str) -> None:
        """C-STORE the study to a configured modality (synchronously)."""
        self.post(f"/modalities/{modality}/store", {"Resources": [study_id], "Synchronous": True})

    def series_of(self, study_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/studies/{study_id}/series?expand"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        with urllib.request.urlopen(  # noqa: S310
            f"{self.url}/instances/{instance_id}/file", timeout=30
        ) as response:
            return bytes(response.read())


def node_and_orthanc(
    workdir: Path, model_dir: Path, **sections: dict[str, object]
) -> tuple[Node, Orthanc]:
    """Orthanc, and a node analysing with *model_dir* that sends its results there; started."""
    delivery = {"interval_seconds": 0.2, **sections.pop("delivery", {})}
    worker = {"count": 1, "model_dir": str(model_dir), **sections.pop("worker", {})}
    node = Node(workdir / "node", worker=worker, delivery=delivery, **sections)
    orthanc = Orthanc(workdir / "orthanc", {"node": ("TRIAGE_NODE", "127.0.0.1", node.port)})
    node.sections["delivery"]["destinations"] = [f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"]
    if "reconcile" in node.sections:  # ask this Orthanc for reports too
        node.sections["reconcile"]["pacs"] = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    node.rewrite_config()
    orthanc.start()
    node.start()
    return node, orthanc
