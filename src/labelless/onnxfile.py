"""ONNX models of any size on disk and in ONNX Runtime, past protobuf's 2 GiB limit.

Protobuf cannot serialise one message of 2 GiB or more, so such a model cannot be written as
one ``.onnx`` file, checked or handed to ONNX Runtime as bytes. Past :data:`PROTOBUF_LIMIT` its
tensors go to one external-data file beside it, ``NAME.onnx.data`` (ONNX's own external-data
format, read by ``onnx.load`` and ONNX Runtime from the same folder); below it, one file as
before. Both files are written into a hidden folder beside the output and renamed into place,
so a failed write leaves neither.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .io import atomic_path, check_output_dir

__all__ = ["PROTOBUF_LIMIT", "too_big", "save", "session", "exported"]

PROTOBUF_LIMIT = 2**31 - 2**26  # bytes: 2 GiB less 64 MiB for the graph around the tensors


def too_big(proto) -> bool:
    """Whether ``proto``'s tensors come near the 2 GiB that protobuf can serialise."""
    return sum(len(t.raw_data) for t in proto.graph.initializer) >= PROTOBUF_LIMIT


def save(proto, path: str | Path) -> list[Path]:
    """Check ``proto`` and write it to ``path`` (and ``path.data`` when :func:`too_big`); returns
    the files written. ``proto`` is left holding external-data references in the second case."""
    import onnx

    path = Path(path)
    if not too_big(proto):
        onnx.checker.check_model(proto, full_check=True)
        with atomic_path(path) as tmp:
            onnx.save_model(proto, str(tmp))
        return [path]
    data = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(dir=check_output_dir(path), prefix=f".{path.name}.") as folder:
        staged = Path(folder) / path.name
        onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name)
        onnx.checker.check_model(str(staged), full_check=True)  # by path: the message alone is too big
        os.replace(Path(folder) / data.name, data)
        os.replace(staged, path)
    return [path, data]


def session(proto):
    """An ONNX Runtime CPU session of ``proto``, through a temporary file when it is too big."""
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    if not too_big(proto):
        return onnxruntime.InferenceSession(proto.SerializeToString(), providers=providers)
    import onnx

    with tempfile.TemporaryDirectory(prefix="labelless-onnx-") as folder:
        file = Path(folder) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)  # saving as external data rewrites the proto it is given
        onnx.save_model(copy, str(file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data")
        return onnxruntime.InferenceSession(str(file), providers=providers)  # reads the data while it exists


def exported(export) -> object:
    """The ModelProto that ``export(file)`` writes to a temporary file (external data included,
    which torch's exporter writes beside the file for a model past 2 GiB)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="labelless-onnx-") as folder:
        file = Path(folder) / "model.onnx"
        export(str(file))
        return onnx.load(str(file))
