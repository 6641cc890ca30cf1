#!/usr/bin/env python3
"""Face-analysis parity fixtures for troupe-faces: insightface's buffalo_l pipeline (SCRFD detection,
5-point alignment, ArcFace embedding) run by insightface's own code on tiny random-weight ONNX models
with the real models' graph interfaces.

Writes crates/troupe-faces/tests/fixtures/ (about 1.2 MB):

* det_tiny.onnx   SCRFD stand-in (opset 11, IR 6, built with onnx.helper). Input `input.1`
                  [1, 3, '?', '?'] (float32 NCHW; H and W dynamic and sharing the symbol '?', as in
                  det_10g.onnx). 9 outputs in SCRFD's order for fmc=3, use_kps, 2 anchors:
                  score_8, score_16, score_32 [N_s*2, 1] (Sigmoid probabilities: SCRFD thresholds
                  them as they are), bbox_8/16/32 [N_s*2, 4] (left, top, right, bottom distances in
                  stride units), kps_8/16/32 [N_s*2, 10] (x0, y0, ..., x4, y4 offsets in stride units);
                  N_s = (H/s)*(W/s), rows in (y, x, anchor) order; rank 2 without a batch axis, as
                  det_10g (insightface's `batched` is False). H and W must be multiples of 32.
                  Ops: Conv, Relu, Concat, Sigmoid, Transpose, Reshape.
                  The network is designed, with small random terms (numpy seed DET_SEED), so that
                  it behaves like a (poor) face detector: an 8x8 stride-8 mean-colour conv and 2x2
                  stride-2 mean convs give the cell colours at strides 8 / 16 / 32; per level, 1x1
                  conv + ReLU maps measure |f - f(SKIN)| for f = R-G, R-B, R, one capped "near
                  skin" map and 4 random texture maps (3x3 conv + ReLU). The score head is a 7x7
                  matched filter per anchor (skin inside the anchor's 3x3 / 5x5 cell window, not
                  skin on the ring around it) + a small random texture term; boxes = the anchor's
                  half size (1.5 / 2.5 strides, a bit taller than wide) + a small random term;
                  keypoints = a face-shaped template scaled by the anchor size + a small random
                  term. It fires on skin-coloured blobs (the astronaut's face, the synthetic
                  ellipses) and a few other places: 3-6 candidates per case with scores 0.5-0.9,
                  NMS removing some, 2-4 faces per case, boxes partly outside the image.
* rec_tiny.onnx   ArcFace stand-in (opset 11). Input `input.1` ['None', 3, 112, 112] (as w600k_r50),
                  output `embedding` ['None', 512]: 4 stride-2 3x3 convs each followed by PRelu
                  (3->8->16->16->4 channels, 112->7), a 7x7 conv to 64x1x1, Flatten, Gemm 64->512,
                  BatchNormalization; random weights (numpy seed REC_SEED). Node names Conv_0,
                  PRelu_1, ...: no Sub / Mul among the first 8 nodes, so ArcFaceONNX takes
                  input_mean = input_std = 127.5 like w600k_r50.
* astronaut.png   skimage.data.astronaut() (512x512 RGB) downscaled to 256x256 with
                  PIL.Image.resize(BICUBIC).
* synthetic.png   203x150 RGB synthetic image (bluish sinusoids + three skin-coloured ellipses).
* aligned_astronaut_320x256.png  the 112x112 `face_align.norm_crop(img, kps, 112)` crop of the
                  ALIGN_CASE's largest face (the astronaut's face), written as an RGB PNG.
* stages.safetensors  float32 tensors of the STAGE_CASE run (synthetic.png at det_size 160x160,
                  letterboxed to 160x118 + padding): `blob` [1, 3, 160, 160] (SCRFD's
                  cv2.dnn.blobFromImage input) and the 9 raw model outputs under their output names.
* faces.json      versions; models (input / output names and shapes, insightface's input_mean /
                  input_std, nms / det thresholds); the exact float32 formulas of both blobs and the
                  decoding; and per case (each image x det_size 160x160, 320x320, 320x256 (W x H),
                  det_thresh 0.5): letterbox (new_width, new_height, det_scale), candidates above
                  the threshold per stride (before NMS), every face in FaceAnalysis.get order (bbox
                  x1 y1 x2 y2, det_score, kps 5x2, embedding, normed_embedding), `largest` = index of
                  the face StoryMaker picks (`sorted(faces, key=bbox area)[-1]`), and `max_num` = the
                  indices SCRFD.detect(max_num=1|2, metric='default'|'max') keeps, in its order; for
                  STAGE_CASE also every pre-NMS candidate (bbox, score, kps, sorted as SCRFD sorts
                  them) and the NMS keep list; for ALIGN_CASE the norm_crop 2x3 matrix. Floats are
                  the float32 (float64 for det_scale and the matrix) values insightface computes,
                  written as exact Python floats. The script asserts margins (no score within 1e-3
                  of the threshold, no near-tied candidates, no IoU within 1e-3 of 0.4, the largest
                  box clear of the next) so a port with other float rounding makes the same calls.

Colour convention: the PNGs are ordinary RGB files. insightface works on BGR arrays, so the script
loads them with cv2.imread (BGR) and passes that array to insightface, exactly as a user of
FaceAnalysis does; blobFromImage(swapRB=True) turns the letterboxed / aligned BGR image back into
RGB, so both networks see RGB planes. A port that decodes the PNG as RGB can letterbox / warp the
RGB image directly and feed it without a channel swap. The aligned crop is written as RGB.

Every result comes from insightface itself: FaceAnalysis(name=<dir with the two models>,
providers=['CPUExecutionProvider']).prepare(ctx_id=-1, det_thresh=0.5, det_size=...).get(img)
(max_num=0), cross-checked against SCRFD(model_file=...) / ArcFaceONNX(model_file=...) driven step by
step as FaceAnalysis.get drives them (the two agree bit for bit).

Run: ~/.cache/troupe-pyref/bin/python scripts/make_face_fixtures.py
(insightface 2.1, onnxruntime 1.32, OpenCV 5.0, numpy 2.4; deterministic: a second run rewrites the
same bytes.)
"""
import json
import os
import shutil
import tempfile
import warnings

import cv2
import insightface
import numpy as np
import onnx
import onnxruntime
import skimage
import skimage.data
from insightface.app import FaceAnalysis
from insightface.app.common import Face
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates/troupe-faces/tests/fixtures")

DET_SIZES = [(160, 160), (320, 320), (320, 256)]  # (width, height) as insightface's det_size
DET_THRESH = 0.5
STAGE_CASE = ("synthetic", (160, 160))
ALIGN_CASE = ("astronaut", (320, 256))
DET_SEED, REC_SEED = 15, 11
STRIDES = (8, 16, 32)

# Detector design constants (normalised units: (v - 127.5) / 128, RGB order as the network sees it).
SKIN = np.array([215.0, 178.0, 155.0])
SKIN_FEATURES = np.array([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0], [1.0, 0.0, 0.0]])  # R - G, R - B, R
SKIN_WEIGHTS = np.array([2.0, 1.5, 1.0])
ANCHOR_SIZE = (1.5, 2.5)  # box half-size per anchor, in strides
WINDOW = (1, 2)  # anchor window half-width in cells: 3x3 and 5x5 inside, ring one cell further out
SCORE_BIAS = {8: (3.2, 3.2), 16: (2.6, 2.6), 32: (2.8, 2.8)}
SCORE_GAIN = 6.0
RING_GAIN = 10.0
RING_CAP = 0.6
TEXTURE = 0.03
KPS_TEMPLATE = np.array([-0.42, -0.3, 0.42, -0.3, 0.0, 0.12, -0.34, 0.5, 0.34, 0.5])


# ------------------------------------------------------------------------------------------------ models

class Graph:
    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, name=None, **attrs):
        name = name or f"{op}_{self.count}"
        self.count += 1
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x, w, b, stride, pad, name=None):
        name = name or f"Conv_{self.count}"
        return self.node("Conv", [x, self.init(name + ".weight", w.astype(np.float32)),
                                  self.init(name + ".bias", b.astype(np.float32))], name=name,
                         kernel_shape=list(w.shape[2:]), strides=[stride, stride], pads=[pad] * 4)

    def model(self, name, inputs, outputs):
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="troupe")
        m.ir_version = 6
        onnx.checker.check_model(m)
        return m


def mean_conv(channels, k):
    w = np.zeros((channels, channels, k, k))
    for c in range(channels):
        w[c, c] = 1.0 / (k * k)
    return w


def det_model():
    rng = np.random.default_rng(DET_SEED)
    g = Graph()
    skin = (SKIN - 127.5) / 128.0
    levels = [g.conv("input.1", mean_conv(3, 8), np.zeros(3), 8, 0, name="mean_8")]
    levels.append(g.conv(levels[0], mean_conv(3, 2), np.zeros(3), 2, 0, name="mean_16"))
    levels.append(g.conv(levels[1], mean_conv(3, 2), np.zeros(3), 2, 0, name="mean_32"))
    heads = {}
    for stride, mean in zip(STRIDES, levels):
        # |feature - skin feature| as relu(f - t) + relu(t - f) for f = R - G, R - B, R.
        w = np.zeros((6, 3, 1, 1))
        b = np.zeros(6)
        for k, (row, target) in enumerate(zip(SKIN_FEATURES, SKIN_FEATURES @ skin)):
            w[2 * k, :, 0, 0], b[2 * k] = row, -target
            w[2 * k + 1, :, 0, 0], b[2 * k + 1] = -row, target
        dist = g.node("Relu", [g.conv(mean, w, b, 1, 0, name=f"dist_{stride}")], name=f"dist_{stride}.relu")
        # capped ring term: relu(CAP - weighted distance) (0 where the colour is far from skin)
        w = np.repeat(SKIN_WEIGHTS, 2)[None, :, None, None] * -1.0
        near = g.node("Relu", [g.conv(dist, w, np.array([RING_CAP]), 1, 0, name=f"near_{stride}")],
                      name=f"near_{stride}.relu")
        tex = g.conv(mean, rng.standard_normal((4, 3, 3, 3)) * 0.8, 0.1 * rng.standard_normal(4), 1, 1,
                     name=f"texture_{stride}")
        tex = g.node("Relu", [tex], name=f"texture_{stride}.relu")
        feat = g.node("Concat", [dist, near, tex], name=f"feat_{stride}", axis=1)  # 6 + 1 + 4 channels
        # score: a matched filter per anchor (7x7 taps in cells): colour close to skin inside the
        # anchor's window, far from skin on the ring one cell further out, plus a small random
        # texture term.
        w = np.zeros((2, 11, 7, 7))
        for a, r in enumerate(WINDOW):
            yy, xx = np.mgrid[-3:4, -3:4]
            ring = np.maximum(abs(yy), abs(xx))
            inside, border = ring <= r, ring == r + 1
            taps = np.where(inside, -SCORE_GAIN / inside.sum(), 0.0)
            w[a, :6] = taps[None] * np.repeat(SKIN_WEIGHTS, 2)[:, None, None]
            w[a, 6] = np.where(border, -RING_GAIN / border.sum(), 0.0)
        w[:, 7:, 2:5, 2:5] = TEXTURE * rng.standard_normal((2, 4, 3, 3))
        score = g.conv(feat, w, np.array(SCORE_BIAS[stride]), 1, 3, name=f"score_{stride}.conv")
        heads["score", stride] = (g.node("Sigmoid", [score], name=f"score_{stride}.sigmoid"), 1)
        # boxes: per-anchor half sizes (a bit taller than wide) + a random term
        w = 0.06 * rng.standard_normal((8, 11, 3, 3))
        b = np.concatenate([s * np.array([1.0, 1.15, 1.0, 1.15]) for s in ANCHOR_SIZE])
        heads["bbox", stride] = (g.conv(feat, w, b, 1, 1, name=f"bbox_{stride}.conv"), 4)
        # keypoints: template scaled by the anchor size + a random term
        w = 0.03 * rng.standard_normal((20, 11, 3, 3))
        b = np.concatenate([s * KPS_TEMPLATE for s in ANCHOR_SIZE])
        heads["kps", stride] = (g.conv(feat, w, b, 1, 1, name=f"kps_{stride}.conv"), 10)
    outputs = []
    for kind in ("score", "bbox", "kps"):
        for stride in STRIDES:
            x, c = heads[kind, stride]
            name = f"{kind}_{stride}"
            t = g.node("Transpose", [x], name=f"{name}.nhwc", perm=[0, 2, 3, 1])
            g.node("Reshape", [t, g.init(f"{name}.shape", np.array([-1, c], np.int64))], name=name)
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["?", c]))
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])]
    return g.model("det_tiny", inputs, outputs)


def rec_model():
    rng = np.random.default_rng(REC_SEED)
    g = Graph()
    x = "input.1"
    chans = [3, 8, 16, 16, 4]
    for i in range(4):  # 112 -> 56 -> 28 -> 14 -> 7
        ci, co = chans[i], chans[i + 1]
        w = rng.standard_normal((co, ci, 3, 3)) * np.sqrt(2.0 / (ci * 9))
        x = g.conv(x, w, 0.1 * rng.standard_normal(co), 2, 1)
        slope = g.init(f"PRelu_{g.count}.slope", (0.25 + 0.05 * rng.standard_normal((co, 1, 1))).astype(np.float32))
        x = g.node("PRelu", [x, slope])
    x = g.conv(x, rng.standard_normal((64, 4, 7, 7)) / np.sqrt(4 * 49), 0.1 * rng.standard_normal(64), 1, 0)  # 7 -> 1
    x = g.node("Flatten", [x], axis=1)
    w = rng.standard_normal((512, 64)) / np.sqrt(64)
    name = f"Gemm_{g.count}"
    x = g.node("Gemm", [x, g.init(name + ".weight", w.astype(np.float32)),
                        g.init(name + ".bias", (0.1 * rng.standard_normal(512)).astype(np.float32))],
               name=name, transB=1)
    bn = [g.init(f"BatchNormalization.{k}", v.astype(np.float32)) for k, v in (
        ("scale", 1.0 + 0.2 * rng.standard_normal(512)), ("bias", 0.1 * rng.standard_normal(512)),
        ("mean", 0.1 * rng.standard_normal(512)), ("var", 1.0 + 0.3 * rng.random(512)))]
    g.node("BatchNormalization", [x] + bn, name="embedding", epsilon=1e-5)
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])]
    return g.model("rec_tiny", inputs, outputs)


# ------------------------------------------------------------------------------------------------ images

def astronaut():
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((256, 256), Image.BICUBIC))


def synthetic(w=203, h=150):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([70 + 50 * np.sin(x / 9 + y / 13), 120 + 70 * np.cos(y / 7 - x / 17),
                    160 + 60 * np.sin((x + 2 * y) / 11)], axis=-1)
    for cx, cy, rx, ry in ((55, 60, 16, 20), (140, 85, 26, 32), (180, 25, 10, 12)):
        d = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
        face = SKIN + 6 * np.sin(x / 3 + y / 4)[..., None] - 20 * d[..., None]
        rgb = np.where((d < 1)[..., None], face, rgb)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ helpers

def floats(a):
    return [float(v) for v in np.asarray(a).ravel()]


def shape_of(value_info):
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def letterbox(img, input_size):
    """SCRFD._detect_candidates' resize + pad (kept here to record the numbers and check the blob)."""
    im_ratio = float(img.shape[0]) / img.shape[1]
    model_ratio = float(input_size[1]) / input_size[0]
    if im_ratio > model_ratio:
        new_height = input_size[1]
        new_width = int(new_height / im_ratio)
    else:
        new_width = input_size[0]
        new_height = int(new_width * im_ratio)
    det_scale = float(new_height) / img.shape[0]
    det_img = np.zeros((input_size[1], input_size[0], 3), dtype=np.uint8)
    det_img[:new_height, :new_width, :] = cv2.resize(img, (new_width, new_height))
    return det_img, new_width, new_height, det_scale


class Recorder:
    """Wraps an SCRFD instance's forward / nms to record per-stride counts and the NMS input."""

    def __init__(self, det):
        self.det, self.calls = det, []
        forward, nms = det.forward, det.nms

        def rec_forward(img, threshold):
            out = forward(img, threshold)
            self.calls.append({"det_img": img.copy(), "per_stride": [int(s.shape[0]) for s in out[0]]})
            return out

        def rec_nms(dets):
            keep = nms(dets)
            self.calls[-1].update(pre_det=dets.copy(), keep=[int(k) for k in keep])
            return keep

        det.forward, det.nms = rec_forward, rec_nms


def decode(raw, det_size, det_scale, threshold):
    """SCRFD.forward + _detect_candidates' decoding, float32 throughout, before the score sort."""
    boxes, kpss, scores = [], [], []
    for k, stride in enumerate(STRIDES):
        h, w = det_size[1] // stride, det_size[0] // stride
        centres = np.stack(np.mgrid[:h, :w][::-1], axis=-1).astype(np.float32).reshape(-1, 2) * stride
        centres = np.repeat(centres, 2, axis=0)  # (y, x, anchor) row order
        keep = raw[k][:, 0] >= threshold
        d, kd = raw[k + 3] * stride, raw[k + 6] * stride
        boxes.append(np.concatenate([centres - d[:, :2], centres + d[:, 2:]], axis=1)[keep])
        kpss.append((np.tile(centres, 5) + kd)[keep])
        scores.append(raw[k][keep, 0])
    scale = np.float32(det_scale)
    return np.concatenate(boxes) / scale, np.concatenate(kpss).reshape(-1, 5, 2) / scale, np.concatenate(scores)


def iou_margin(pre, thresh):
    """Smallest |IoU - thresh| over the pairs SCRFD.nms compares (its +1 pixel convention)."""
    x1, y1, x2, y2 = pre[:, 0], pre[:, 1], pre[:, 2], pre[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    margin = np.inf
    for i in range(len(pre)):
        for j in range(i + 1, len(pre)):
            w = max(0.0, min(x2[i], x2[j]) - max(x1[i], x1[j]) + 1)
            h = max(0.0, min(y2[i], y2[j]) - max(y1[i], y1[j]) + 1)
            margin = min(margin, abs(w * h / (areas[i] + areas[j] - w * h) - thresh))
    return margin


def face_record(face):
    return {"bbox": floats(face.bbox), "det_score": float(face.det_score),
            "kps": [floats(p) for p in face.kps], "embedding": floats(face.embedding),
            "normed_embedding": floats(face.normed_embedding)}


# ------------------------------------------------------------------------------------------------ main

def main():
    # insightface's estimate_norm calls SimilarityTransform.estimate, deprecated in scikit-image 0.26.
    warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    det_path, rec_path = os.path.join(OUT, "det_tiny.onnx"), os.path.join(OUT, "rec_tiny.onnx")
    det_proto, rec_proto = det_model(), rec_model()
    onnx.save(det_proto, det_path)
    onnx.save(rec_proto, rec_path)
    images = {"astronaut": astronaut(), "synthetic": synthetic()}
    for name, rgb in images.items():
        Image.fromarray(rgb).save(os.path.join(OUT, f"{name}.png"))

    # The reference: FaceAnalysis over a folder holding just the two models.
    with tempfile.TemporaryDirectory() as tmp:
        for p in (det_path, rec_path):
            shutil.copy(p, tmp)
        app = FaceAnalysis(name=tmp, providers=["CPUExecutionProvider"])
        # The same models driven step by step as FaceAnalysis.get drives them.
        det = SCRFD(model_file=det_path)
        rec = ArcFaceONNX(model_file=rec_path)
        rec.prepare(ctx_id=-1)
        recorder = Recorder(det)
        assert isinstance(app.models["detection"], SCRFD) and isinstance(app.models["recognition"], ArcFaceONNX)
        assert (rec.input_mean, rec.input_std) == (127.5, 127.5)
        assert (det.input_mean, det.input_std, det.nms_thresh, det.batched) == (127.5, 128.0, 0.4, False)

        cases, stages = [], {}
        for name in images:
            img = cv2.imread(os.path.join(OUT, f"{name}.png"))  # BGR, as insightface expects
            assert np.array_equal(img[:, :, ::-1], images[name])
            for det_size in DET_SIZES:
                app.prepare(ctx_id=-1, det_thresh=DET_THRESH, det_size=det_size)
                faces = app.get(img)
                det.prepare(ctx_id=-1, input_size=det_size, det_thresh=DET_THRESH)
                recorder.calls.clear()
                bboxes, kpss = det.detect(img, max_num=0, metric="default")
                call = recorder.calls[-1]
                mine = []
                for i in range(bboxes.shape[0]):
                    face = Face(bbox=bboxes[i, 0:4], kps=kpss[i], det_score=bboxes[i, 4])
                    rec.get(img, face)
                    mine.append(face)
                assert len(mine) == len(faces) >= 1, (name, det_size, len(faces))
                for a, b in zip(faces, mine):
                    for key in ("bbox", "kps", "det_score", "embedding", "normed_embedding"):
                        va, vb = getattr(a, key), getattr(b, key)
                        assert np.array_equal(va, vb) and va.dtype == vb.dtype == np.float32, key

                # Letterbox, blob and raw outputs as SCRFD computes them.
                det_img, new_w, new_h, det_scale = letterbox(img, det_size)
                assert np.array_equal(det_img, call["det_img"])
                blob = det._prepare_input_blob(det_img, det_size)
                ref = ((det_img[:, :, ::-1].astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
                assert np.array_equal(blob, ref)
                session = det._session_for_input_size(det_size)
                raw = session.run(det.output_names, {det.input_name: blob})
                for k, stride in enumerate(STRIDES):
                    n = (det_size[0] // stride) * (det_size[1] // stride) * 2
                    assert raw[k].shape == (n, 1) and raw[k + 3].shape == (n, 4) and raw[k + 6].shape == (n, 10)
                    assert int((raw[k] >= DET_THRESH).sum()) == call["per_stride"][k]
                pre, keep = call["pre_det"], call["keep"]
                boxes, kps_all, scores = decode(raw, det_size, det_scale, DET_THRESH)
                order = np.argsort(-scores, kind="stable")
                assert np.array_equal(pre, np.hstack([boxes, scores[:, None]])[order])
                assert np.array_equal(kpss, kps_all[order][keep])
                assert len(set(floats(pre[:, 4]))) == len(pre), "tied scores: ordering would be ambiguous"
                assert len(keep) < len(pre), "NMS suppresses nothing"
                # Margins, so that a port whose float results differ in the last bits (another
                # runtime, another summation order) still makes the same decisions.
                all_scores = np.concatenate([raw[k][:, 0] for k in range(3)])
                assert np.abs(all_scores - DET_THRESH).min() > 1e-3, "a score within 1e-3 of det_thresh"
                assert len(pre) < 2 or np.diff(np.sort(pre[:, 4])).min() > 1e-3, "near-tied scores"
                assert iou_margin(pre, det.nms_thresh) > 1e-3, "an IoU within 1e-3 of nms_thresh"

                areas = [float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])) for f in faces]
                largest = areas.index(max(areas))
                assert sorted(areas)[-1] - sorted(areas)[-2] > 1.0, "two faces of about the largest area"
                picked = sorted(faces, key=lambda x: (x["bbox"][2] - x["bbox"][0]) * (x["bbox"][3] - x["bbox"][1]))[-1]
                assert picked is faces[largest]

                max_num = {}
                for metric in ("default", "max"):
                    for n in (1, 2):
                        sel, _ = det.detect(img, max_num=n, metric=metric)
                        idx = [next(i for i in range(len(bboxes)) if np.array_equal(bboxes[i], row)) for row in sel]
                        max_num[f"{n}_{metric}"] = idx

                case = {
                    "image": f"{name}.png", "det_size": list(det_size), "det_thresh": DET_THRESH,
                    "letterbox": {"new_width": new_w, "new_height": new_h, "det_scale": det_scale},
                    "candidates_per_stride": call["per_stride"], "num_candidates": int(len(pre)),
                    "num_faces": len(faces), "largest": largest, "max_num": max_num,
                    "faces": [face_record(f) for f in faces],
                }
                tag = f"{name}_{det_size[0]}x{det_size[1]}"
                if (name, det_size) == STAGE_CASE:
                    case["stages"] = "stages.safetensors"
                    case["candidates"] = [{"bbox": floats(p[:4]), "score": float(p[4]), "kps": [floats(q) for q in kp]}
                                          for p, kp in zip(pre, kps_all[order])]
                    case["nms_keep"] = keep
                    stages["blob"] = blob
                    for oname, value in zip(det.output_names, raw):
                        stages[oname] = np.ascontiguousarray(value)
                if (name, det_size) == ALIGN_CASE:
                    face = faces[largest]
                    m = face_align.estimate_norm(face.kps, 112)
                    crop = face_align.norm_crop(img, landmark=face.kps, image_size=112)
                    assert np.array_equal(rec.get_feat(crop).flatten(), face.embedding)
                    rec_blob = cv2.dnn.blobFromImages([crop], 1.0 / rec.input_std, rec.input_size,
                                                      (rec.input_mean,) * 3, swapRB=True)
                    rgb = crop[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)
                    assert np.array_equal(rec_blob, (rgb - np.float32(127.5)) * np.float32(1 / 127.5))
                    crop_name = f"aligned_{tag}.png"
                    Image.fromarray(np.ascontiguousarray(crop[:, :, ::-1])).save(os.path.join(OUT, crop_name))
                    case["aligned"] = {"face": largest, "image": crop_name, "matrix": [floats(r) for r in m]}
                cases.append(case)
                print(f"{tag}: candidates {call['per_stride']} -> {len(faces)} faces, largest {largest}, "
                      f"scores {[round(float(f.det_score), 3) for f in faces]}")
    save_file(stages, os.path.join(OUT, "stages.safetensors"))

    doc = {
        "versions": {"insightface": insightface.__version__, "onnxruntime": onnxruntime.__version__,
                     "opencv": cv2.__version__, "numpy": np.__version__, "onnx": onnx.__version__,
                     "scikit-image": skimage.__version__},
        "color": "PNG files are RGB; insightface was given the cv2.imread (BGR) array",
        "arithmetic": {
            "det_blob": "float32 (rgb - 127.5) * float32(1/128), letterboxed image, NCHW",
            "rec_blob": "float32 (rgb - 127.5) * float32(1/127.5), aligned crop, NCHW",
            "decode": ("float32: centre (x*s, y*s) -/+ distance*s, keypoints centre + offset*s, "
                       "then / float32(det_scale)"),
        },
        "models": {
            "det": {"file": "det_tiny.onnx", "input": {"name": "input.1", "shape": shape_of(det_proto.graph.input[0])},
                    "outputs": [{"name": o.name, "shape": shape_of(o)} for o in det_proto.graph.output],
                    "input_mean": det.input_mean, "input_std": det.input_std, "swap_rb": True,
                    "strides": list(STRIDES), "num_anchors": det._num_anchors, "nms_thresh": det.nms_thresh,
                    "det_thresh": DET_THRESH},
            "rec": {"file": "rec_tiny.onnx", "input": {"name": "input.1", "shape": shape_of(rec_proto.graph.input[0])},
                    "outputs": [{"name": o.name, "shape": shape_of(o)} for o in rec_proto.graph.output],
                    "input_mean": rec.input_mean, "input_std": rec.input_std, "swap_rb": True,
                    "input_size": list(rec.input_size)},
        },
        "images": {"astronaut.png": "skimage.data.astronaut() 512x512 -> 256x256, PIL BICUBIC",
                   "synthetic.png": "203x150 synthetic"},
        "cases": cases,
    }
    with open(os.path.join(OUT, "faces.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    total = 0
    for fn in sorted(os.listdir(OUT)):
        size = os.path.getsize(os.path.join(OUT, fn))
        total += size
        print(f"{fn:40s} {size:8d}")
    print(f"{'total':40s} {total:8d}")
    assert total < 1_500_000
    print("wrote", OUT)


if __name__ == "__main__":
    main()
