""".ci/offline_wheels.py: slimmed wheels keep a RECORD that matches their files; parts keep to their size."""
import sys
import zipfile

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / ".ci"))  # a script of .ci/, not a package
from offline_wheels import project_name, slim, split_into_parts  # noqa: E402


def _wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items())
        z.writestr("pkg-1.0.dist-info/RECORD", record + "pkg-1.0.dist-info/RECORD,,\n")
    return path


def test_slim_drops_the_files_and_their_record_lines(tmp_path):
    wheel = _wheel(tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl",
                   {"ray/__init__.py": b"x", "ray/jars/ray_dist.jar": b"j" * 100, "ray/tune/__init__.py": b"t"})
    out = tmp_path / "out"
    out.mkdir()
    slimmed = slim(wheel, ("ray/jars/",), out)
    with zipfile.ZipFile(slimmed) as z:
        names = set(z.namelist())
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert names == {"ray/__init__.py", "ray/tune/__init__.py", "pkg-1.0.dist-info/RECORD"}
    assert "jars" not in record and "ray/tune/__init__.py" in record
    assert project_name(slimmed) == "ray"


def test_parts_keep_under_the_limit_and_refuse_a_wheel_over_it(tmp_path):
    wheels = []
    for i, size in enumerate([60, 50, 30, 20, 10]):
        path = tmp_path / f"w{i}-1.0-py3-none-any.whl"
        path.write_bytes(b"0" * size)
        wheels.append(path)
    parts = split_into_parts(wheels, 80, tmp_path / "out")
    sizes = [sum(f.stat().st_size for f in part.iterdir()) for part in parts]
    assert sum(sizes) == 170 and all(s <= 80 for s in sizes) and len(parts) == 3
    big = tmp_path / "big-1.0-py3-none-any.whl"
    big.write_bytes(b"0" * 100)
    with pytest.raises(SystemExit, match="over --part-mib"):
        split_into_parts([big], 80, tmp_path / "out2")
