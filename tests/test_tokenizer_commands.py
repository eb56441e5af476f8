"""`cinedit tokenizer reconstruct | encode | decode` on the sample clips, and their refusals."""

from __future__ import annotations

import argparse

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from cinedit.data.video import probe, write_video
from cinedit.tokenizer import commands
from cinedit.tokenizer.loading import save_pretrained, tokenizer_hash
from cinedit.tokenizer.model import PRESETS, VideoDCAE


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    commands.add_cli(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_pretrained(VideoDCAE(PRESETS["debug"]()), tmp_path_factory.mktemp("tok") / "model"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 64x96 moving clip, a 48x64 clip (not a multiple of 32), a photo and a text file named .mp4."""
    d = tmp_path_factory.mktemp("clips")
    t = np.arange(10)[:, None, None, None]
    yy, xx = np.mgrid[:64, :96]
    frames = (127 + 100 * np.sin((xx[None, ..., None] + 3 * t) / 9 + yy[None, ..., None] / 13)).astype(np.uint8)
    write_video(d / "wave.mp4", np.repeat(frames, 3, axis=-1), 25)
    write_video(d / "odd.mp4", np.repeat(frames[:, :48, :64], 3, axis=-1), 25)
    Image.fromarray(np.repeat(frames[0], 3, axis=-1)).save(d / "photo.png")
    (d / "notes.mp4").write_text("not a video")
    return d


def test_reconstruct_a_clip(ckpt, clips, tmp_path, capsys):
    out = tmp_path / "rec.mp4"
    assert run("reconstruct", str(clips / "wave.mp4"), "--out", str(out), "--ckpt", ckpt, "--device", "cpu") == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "SSIM" in text and "8 frame(s) 64x96" in text
    info = probe(out)
    assert (info.num_frames, info.height, info.width) == (8, 64, 96) and info.fps == pytest.approx(25)
    # No silent overwrite.
    assert run("reconstruct", str(clips / "wave.mp4"), "--out", str(out), "--ckpt", ckpt) == 2
    assert "exists" in capsys.readouterr().err


def test_encode_then_decode_round_trip(ckpt, clips, tmp_path):
    lat = tmp_path / "wave.safetensors"
    assert run("encode", str(clips / "wave.mp4"), "--out", str(lat), "--ckpt", ckpt) == 0
    with safe_open(str(lat), framework="pt") as f:
        meta, z = f.metadata(), f.get_tensor("latent")
    assert z.shape == (16, 2, 2, 3)
    assert meta["num_frames"] == "8" and meta["height"] == "64" and float(meta["fps"]) == pytest.approx(25)
    assert meta["tokenizer_config_hash"] == tokenizer_hash(VideoDCAE(PRESETS["debug"]()))
    out = tmp_path / "wave.mp4"
    assert run("decode", str(lat), "--out", str(out), "--ckpt", ckpt) == 0
    assert probe(out).num_frames == 8


def test_pad_crops_back_and_bad_size_is_refused(ckpt, clips, tmp_path, capsys):
    assert run("reconstruct", str(clips / "odd.mp4"), "--out", str(tmp_path / "a.mp4"), "--ckpt", ckpt) == 2
    err = capsys.readouterr().err
    assert "48x64 is not a multiple of 32" in err and "--pad" in err
    assert run("reconstruct", str(clips / "odd.mp4"), "--out", str(tmp_path / "b.mp4"), "--ckpt", ckpt, "--pad") == 0
    assert (probe(tmp_path / "b.mp4").height, probe(tmp_path / "b.mp4").width) == (48, 64)
    lat = tmp_path / "odd.safetensors"
    assert run("encode", str(clips / "odd.mp4"), "--out", str(lat), "--ckpt", ckpt, "--pad") == 0
    assert run("decode", str(lat), "--out", str(tmp_path / "c.mp4"), "--ckpt", ckpt) == 0
    assert probe(tmp_path / "c.mp4").height == 48


def test_missing_and_non_video_inputs(ckpt, clips, tmp_path, capsys):
    assert run("reconstruct", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "x.mp4"), "--ckpt", ckpt) == 2
    assert "no such file" in capsys.readouterr().err
    assert run("reconstruct", str(clips / "notes.mp4"), "--out", str(tmp_path / "x.mp4"), "--ckpt", ckpt) == 2
    assert "not a readable video" in capsys.readouterr().err
    assert run("reconstruct", str(clips / "wave.mp4"), "--out", str(tmp_path / "x.mp4")) == 2
    assert "--ckpt is required" in capsys.readouterr().err
    assert run("decode", str(clips / "wave.mp4"), "--out", str(tmp_path / "y.mp4"), "--ckpt", ckpt) == 2
    assert "latent files" in capsys.readouterr().err


def test_folder_input_skips_bad_files_and_keeps_existing(ckpt, clips, tmp_path, capsys):
    out = tmp_path / "recs"
    assert run("reconstruct", str(clips), "--out", str(out), "--ckpt", ckpt, "--quiet") == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["photo.png", "wave.mp4"]
    assert "notes.mp4" in captured.err and "odd.mp4" in captured.err and "2 of 4 input(s) failed" in captured.err
    assert np.asarray(Image.open(out / "photo.png")).shape == (64, 96, 3)
    assert run("reconstruct", str(clips), "--out", str(out), "--ckpt", ckpt, "--quiet", "--pad") == 1
    assert "photo.png exists, kept" in capsys.readouterr().out


def test_decode_refuses_another_tokenizer(ckpt, clips, tmp_path, capsys):
    lat = tmp_path / "w.safetensors"
    assert run("encode", str(clips / "wave.mp4"), "--out", str(lat), "--ckpt", ckpt) == 0
    cfg = PRESETS["debug"]()
    cfg.latent_channels = 32
    other = str(save_pretrained(VideoDCAE(cfg), tmp_path / "other"))
    assert run("decode", str(lat), "--out", str(tmp_path / "w.mp4"), "--ckpt", other) == 2
    assert "config hash" in capsys.readouterr().err


def test_reconstruct_sample_clip(ckpt, sample_data, tmp_path, capsys):
    root, _ = sample_data
    out = tmp_path / "bunny.mp4"
    argv = ["reconstruct", str(root / "videos/bunny_wakes.mp4"), "--out", str(out), "--ckpt", ckpt]
    assert run(*argv, "--size", "64", "96", "--max-frames", "8") == 0
    assert "8 frame(s) 64x96" in capsys.readouterr().out
    # 360x640 is not a multiple of 32: refused without --size / --pad.
    assert run(*argv, "--overwrite") == 2
    assert "360x640 is not a multiple of 32" in capsys.readouterr().err


def test_same_named_inputs_never_share_an_output_and_decode_takes_encodes_folder(ckpt, tmp_path, capsys):
    # clip.mp4 / clip.mkv / clip.webm in one folder, and a/video.mp4 + b/video.mp4 in a meta file, used to write one
    # output and keep the rest as "exists, kept" (exit 0); decode refused the folder encode wrote.
    frames = np.repeat((np.linspace(0, 255, 4 * 32 * 32).reshape(4, 32, 32, 1) % 256).astype(np.uint8), 3, axis=-1)
    src = tmp_path / "src"
    for name in ("clip.mp4", "clip.mkv", "sub/clip.mp4"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(src / name, frames, 25)
    lat = tmp_path / "lat"
    assert run("encode", str(src), "--out", str(lat), "--ckpt", ckpt, "--quiet") == 0
    names = sorted(str(p.relative_to(lat)) for p in lat.rglob("*.safetensors"))
    assert names == ["clip.mkv.safetensors", "clip.mp4.safetensors", "sub/clip.mp4.safetensors"]
    dec = tmp_path / "dec"
    assert run("decode", str(lat), "--out", str(dec), "--ckpt", ckpt, "--quiet") == 0
    assert sorted(str(p.relative_to(dec)) for p in dec.rglob("*.mp4")) == ["clip.mkv.mp4", "clip.mp4", "sub/clip.mp4"]
    assert probe(dec / "clip.mkv.mp4").num_frames == 4
    # A meta file: paths relative to the folder the files share.
    rows = [commands.find_inputs(src)[0][i] for i in range(3)]
    outs = commands.output_names(rows, None, tmp_path / "o", lambda s: ".mp4")
    assert sorted(str(p.relative_to(tmp_path / "o")) for p in outs) == ["clip.mkv.mp4", "clip.mp4", "sub/clip.mp4"]
    with pytest.raises(commands.InputError, match="would both be written to"):
        commands.output_names([src / "clip.mp4", tmp_path / "clip.mp4"], src, tmp_path / "o", lambda s: ".mp4")


def test_out_naming_a_folder_for_one_input_is_a_clear_error(ckpt, clips, tmp_path, capsys):
    (tmp_path / "recs").mkdir()
    assert run("reconstruct", str(clips / "wave.mp4"), "--out", str(tmp_path / "recs"), "--ckpt", ckpt) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "Traceback" not in err
    assert list((tmp_path / "recs").iterdir()) == []  # no temp file left behind


def test_pad_of_an_odd_sized_clip_writes_an_even_mp4(ckpt, tmp_path):
    # A 37x45 clip (H.264 needs even sides) used to be encoded and decoded, then fail when the mp4 was written.
    src = tmp_path / "odd.mkv"  # lossless, which write_video (H.264) cannot write at odd sizes
    with av.open(str(src), "w") as f:
        stream = f.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 45, 37, "yuv444p"
        for i in range(4):
            img = np.full((37, 45, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                f.mux(packet)
        for packet in stream.encode():
            f.mux(packet)
    out = tmp_path / "rec.mp4"
    assert run("reconstruct", str(src), "--out", str(out), "--ckpt", ckpt, "--pad") == 0
    assert (probe(out).height, probe(out).width, probe(out).num_frames) == (38, 46, 4)
