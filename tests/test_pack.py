"""``python -m sgengine.data pack``: sources, parallel decoding, resumption, and refusing bad input."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from sgengine.data import load_array, load_data, open_pack
from sgengine.data import pack as pack_module
from sgengine.data.__main__ import main
from sgengine.data.decode import adm_center_crop, decode_image
from sgengine.data.pack import pack
from sgengine.data.store import DATA, MANIFEST, PROGRESS


def _jpeg(path, h, w, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def _folder(root, per_class=4):
    for c, cls in enumerate(("cats", "dogs")):
        (root / cls / "deep").mkdir(parents=True)
        for i in range(per_class):
            _jpeg(root / cls / ("deep" if i % 2 else "") / f"{i}.jpg", 40 + 3 * i, 50, 10 * c + i)
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_pack_folder_in_parallel_matches_serial_decoding(tmp_path):
    src = _folder(tmp_path / "src")
    man = pack(src, tmp_path / "p", 16, workers=2, chunk=3, progress=False)
    assert man["count"] == 8 and man["size"] == 16 and man["dtype"] == "uint8" and man["layout"] == "NHWC"
    assert [s[0] for s in man["skipped"]] == ["dogs/broken.jpg"] and "UnidentifiedImageError" in man["skipped"][0][1]
    data = open_pack(tmp_path / "p", 16, 3)
    assert data.images.shape == (8, 3, 16, 16) and data.labels.tolist() == [0] * 4 + [1] * 4
    for i in (0, 5):
        want = decode_image(src / data.names[i], 16, 3)
        assert torch.equal(data.images[i], torch.from_numpy(want).permute(2, 0, 1))
    rows = data.images.permute(0, 2, 3, 1).double()
    assert np.allclose(man["stats"]["mean"], rows.mean((0, 1, 2)).numpy(), atol=1e-4)
    assert np.allclose(man["stats"]["std"], rows.std((0, 1, 2), unbiased=False).numpy(), atol=1e-4)
    assert not (tmp_path / "p" / PROGRESS).exists()


def test_adm_centre_crop_box_halves_then_bicubic():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 140, 3), dtype=np.uint8))
    out = adm_center_crop(im, 16)
    half = im.resize((70, 35), Image.BOX).resize((35, 17), Image.BOX).resize((33, 16), Image.BICUBIC)  # 70, 35, 17
    assert out.shape == (16, 16, 3) and np.array_equal(out, np.asarray(half)[:, 8:24])


def test_killed_pack_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    src = _folder(tmp_path / "src", per_class=6)
    pack(src, tmp_path / "clean", 8, workers=0, chunk=2, progress=False)
    calls, real = [], pack_module.run_task

    def dies(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(pack_module, "run_task", dies)
    with pytest.raises(KeyboardInterrupt):
        pack(src, tmp_path / "p", 8, workers=0, chunk=2, progress=False)
    assert not (tmp_path / "p" / MANIFEST).exists()
    with pytest.raises(ValueError, match="unfinished pack"):
        open_pack(tmp_path / "p")
    with open(tmp_path / "p" / PROGRESS, "a") as fh:
        fh.write('{"task": 2, "cur')  # a torn line, as a kill mid-append leaves it
    monkeypatch.setattr(pack_module, "run_task", real)
    logs = []
    man = pack(src, tmp_path / "p", 8, workers=0, chunk=2, progress=False, log=logs.append)
    assert "2 task(s) resumed" in logs[0]
    assert (tmp_path / "p" / DATA).read_bytes() == (tmp_path / "clean" / DATA).read_bytes()
    assert man["skipped"] == json.loads((tmp_path / "clean" / MANIFEST).read_text())["skipped"]
    with pytest.raises(ValueError, match="other arguments"):
        (tmp_path / "q").mkdir()
        (tmp_path / "q" / PROGRESS).write_text((tmp_path / "p" / MANIFEST).read_text().replace("\n", "") + "\n")
        pack(src, tmp_path / "q", 8, workers=0, progress=False)


def test_official_imagenet_npz_batches(tmp_path):
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 255, (5, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "train_data_batch_1.npz", data=chw.reshape(5, -1), labels=[1, 2, 3, 1000, 5],
             mean=np.zeros(192))
    man = pack(tmp_path / "train_data_batch_1.npz", tmp_path / "p8", 8, workers=0, progress=False)
    d = open_pack(tmp_path / "p8", 8)
    assert torch.equal(d.images, torch.from_numpy(chw)) and d.labels.tolist() == [0, 1, 2, 999, 4]
    assert man["source_kind"] == "npz" and d.names[3] == "train_data_batch_1.npz[3]"
    pack(tmp_path / "train_data_batch_1.npz", tmp_path / "p4", 4, workers=2, chunk=2, progress=False)
    assert open_pack(tmp_path / "p4", 4).images.shape == (5, 3, 4, 4)
    assert torch.equal(load_array(tmp_path / "train_data_batch_1.npz").images, torch.from_numpy(chw))


def test_webdataset_tar_shards(tmp_path):
    (tmp_path / "shards").mkdir()
    for s in range(2):
        with tarfile.open(tmp_path / "shards" / f"s{s}.tar", "w") as tar:
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(np.full((12, 12, 3), 40 * i + s, np.uint8)).save(buf, "PNG")
                for name, blob in ((f"x/{s}{i}.png", buf.getvalue()), (f"x/{s}{i}.cls", str(i).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    pack(tmp_path / "shards", tmp_path / "p", 8, workers=2, chunk=2, progress=False)
    d = open_pack(tmp_path / "p")
    assert d.labels.tolist() == [0, 1, 2, 0, 1, 2] and d.names[4] == "s1.tar/x/11"
    assert d.images[4].unique().tolist() == [41]
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.tar").write_bytes(b"\x1f\x8b not a plain tar")
    with pytest.raises(ValueError, match="plain .tar"):
        pack(tmp_path / "gz", tmp_path / "q", 8, progress=False)


def test_sixteen_bit_and_degenerate_images(tmp_path):
    (tmp_path / "s").mkdir()
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(tmp_path / "s" / "deep.png")
    Image.fromarray(np.full((1, 500), 90, np.uint8)).save(tmp_path / "s" / "thin.png")
    man = pack(tmp_path / "s", tmp_path / "p", 8, workers=0, progress=False)
    assert open_pack(tmp_path / "p").images.unique().tolist() == [round(40000 / 257)]  # not saturated at 255
    assert man["skipped"][0][0] == "thin.png" and "degenerate 500x1" in man["skipped"][0][1]


def test_empty_sources_refused_before_any_work(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        pack(tmp_path / "empty", tmp_path / "p", 8)
    assert not (tmp_path / "p").exists()
    np.save(tmp_path / "e.npy", np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="holds no images"):
        load_array(tmp_path / "e.npy", 8)


def test_pack_of_another_size_or_truncated_is_refused(tmp_path):
    src = _folder(tmp_path / "src", per_class=1)
    pack(src, tmp_path / "p", 8, workers=0, progress=False)
    with pytest.raises(ValueError, match=r"at 8 px but the model takes 16 px: pack the source at 16"):
        load_data(str(tmp_path / "p"), 16, 3)
    with pytest.raises(ValueError, match="3-channel images but the model takes 1"):
        load_data(str(tmp_path / "p"), 8, 1)
    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cannot read .*a.npy .*truncated or partial copy\? copy it again"):
        load_data(str(tmp_path / "a.npy"), 8)
    data = (tmp_path / "p" / DATA).read_bytes()
    (tmp_path / "p" / DATA).write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"data.bin has \d+ bytes but the manifest says \d+ \(truncated"):
        open_pack(tmp_path / "p")


def test_array_rules(tmp_path):
    deep = np.full((3, 8, 8, 3), 65535, np.uint16)
    np.save(tmp_path / "u16.npy", deep)
    assert load_array(tmp_path / "u16.npy", 8).images.unique().tolist() == [255]
    bad = np.zeros((4, 4, 8, 8), np.float32)
    bad[2, 1, 3, 4], bad[3, 0, 0, 0] = np.nan, np.inf
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match=r"holds 2 NaN/Inf value\(s\), the first at index \(2, 1, 3, 4\)"):
        load_array(tmp_path / "nan.npy", 8)
    np.save(tmp_path / "wide.npy", np.zeros((2, 24, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="non-square 24x16 images but the model takes 16x16.*--data_resize"):
        load_array(tmp_path / "wide.npy", 16)
    assert load_array(tmp_path / "wide.npy", 16, resize=True).images.shape == (2, 3, 16, 16)
    np.save(tmp_path / "i32.npy", np.full((2, 8, 8), 300, np.int32))
    with pytest.raises(ValueError, match=r"values in \[300, 300\] are not 8-bit"):
        load_array(tmp_path / "i32.npy", 8)


def test_float_arrays_are_kept_as_they_are(tmp_path):
    z = (np.random.default_rng(0).standard_normal((6, 4, 8, 8)) * 3).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    d = load_array(tmp_path / "z.npy", 8)
    assert d.images.dtype == torch.float32 and torch.equal(d.images, torch.from_numpy(z))  # no clipping to [-1, 1]
    assert d.stats["dtype"] == "float32" and np.allclose(d.stats["std"], z.std((0, 2, 3)), atol=1e-4)
    np.savez(tmp_path / "f.npz", x=z)
    with pytest.raises(ValueError, match="float arrays are not packed"):
        pack(tmp_path / "f.npz", tmp_path / "pf", 8, workers=0, progress=False)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["pack", str(tmp_path / "missing"), str(tmp_path / "p"), "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pack source") and err.count("\n") == 1


def test_pack_killed_with_sigkill_resumes(tmp_path):
    """A real kill -9 of the CLI mid-pack (once a task is recorded), then the same command again."""
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        _jpeg(src / f"{i:03d}.jpg", 48, 48, i)
    cmd = [sys.executable, "-m", "sgengine.data", "pack", str(src), str(tmp_path / "p"), "--size", "16",
           "--workers", "0", "--chunk", "2", "--quiet"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        lines = (tmp_path / "p" / PROGRESS).read_text().count("\n") if (tmp_path / "p" / PROGRESS).exists() else 0
        if lines >= 3:  # the header and two finished tasks
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the pack finished before it could be killed: use more images"
    assert subprocess.run(cmd).returncode == 0
    pack(src, tmp_path / "clean", 16, workers=2, chunk=5, progress=False)  # any chunking gives the same rows
    assert (tmp_path / "p" / DATA).read_bytes() == (tmp_path / "clean" / DATA).read_bytes()
    assert json.loads((tmp_path / "p" / MANIFEST).read_text())["count"] == 300
