#!/usr/bin/env python3
"""Writes a one-layer OCI image archive from a root filesystem tarball, without any
container daemon, matching packaging/container/Containerfile (entrypoint, user, PATH,
volume). Load it with `podman load -i`, `skopeo copy oci-archive:FILE docker://REF` or
`ctr images import`.

    oci-archive.py ROOTFS.tar REF OUT.oci.tar      build
    oci-archive.py --extract OUT.oci.tar DIR       unpack the image's root filesystem

Deterministic: the same rootfs.tar gives the same digests."""

import gzip
import hashlib
import io
import json
import sys
import tarfile


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def build(rootfs_path, ref, out_path):
    raw = open(rootfs_path, "rb").read()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as f:
        f.write(raw)
    layer_digest, layer = blob(gz.getvalue())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": ["/usr/bin/listenscope-collector"],
            "User": "65532:65532",
            "Volumes": {"/data": {}},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "scripts/package (packaging/container/Containerfile)"}],
    }
    config_digest, config_bytes = blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": len(layer),
            }
        ],
    }
    manifest_digest, manifest_bytes = blob(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    files = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index, sort_keys=True).encode()),
    ]
    for digest, data in [
        (layer_digest, layer),
        (config_digest, config_bytes),
        (manifest_digest, manifest_bytes),
    ]:
        files.append(("blobs/sha256/" + digest.split(":")[1], data))
    with tarfile.open(out_path, "w") as tar:
        for d in ["blobs", "blobs/sha256"]:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


def extract(archive, dest):
    """Checks every digest on the way, then unpacks the single layer into DEST."""
    with tarfile.open(archive) as tar:
        def read(name):
            return tar.extractfile(name).read()

        def by_digest(d):
            data = read("blobs/sha256/" + d.split(":")[1])
            if "sha256:" + hashlib.sha256(data).hexdigest() != d:
                sys.exit(f"oci-archive: blob {d} does not match its digest")
            return data

        index = json.loads(read("index.json"))
        manifest = json.loads(by_digest(index["manifests"][0]["digest"]))
        config = json.loads(by_digest(manifest["config"]["digest"]))
        (layer,) = manifest["layers"]
        raw = gzip.decompress(by_digest(layer["digest"]))
        if "sha256:" + hashlib.sha256(raw).hexdigest() != config["rootfs"]["diff_ids"][0]:
            sys.exit("oci-archive: layer does not match its diff_id")
        with tarfile.open(fileobj=io.BytesIO(raw)) as fs:
            try:
                fs.extractall(dest, filter="fully_trusted")
            except TypeError:  # Python before 3.11.4: no extraction filters
                fs.extractall(dest)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--extract":
        extract(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4:
        build(*sys.argv[1:])
    else:
        sys.exit(__doc__)
