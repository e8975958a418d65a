"""Stages 2-4 as one analysis stage: detect faces, track them, gate them, give each the 5 alignment points and the
outline that masks the background away, crop and measure them. `Analyser` hands the scoring stages frozen
`Analysed` records.

Where the detector gives keypoints (SCRFD, YuNet), they align the face and an ellipse on them is the mask: no mesh
call. Where it does not (mediapipe), or where `detect.landmarks = "mesh"` asks for it, mediapipe's face mesh
supplies both.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from .align import crop_face
from .batching import JoinedEngine
from .cascade import in_profile, yaw_ratio
from .config import Config, DetectConfig
from .decode import VideoFrame
from .detect import Detections, box_iou, create_detector, detection_stride, input_scale
from .errors import InputError
from .landmarks import FaceLandmarks, FaceMesher, keypoint_landmarks
from .measures import measure
from .select import ScoredFace, pose_bin
from .track import FaceTracker


# Least IoU between a face's box and the face found again on a crop around it: in the same frame (keypoints
# refined), and a sample interval later (a tracked face between full-frame detections).
REFINE_IOU = 0.5
REVISIT_IOU = 0.3


def _face_scale(face_px: int, min_face: int) -> float:
    """The scale at which a `min_face` face is `face_px` pixels (inf: no such bound)."""
    return face_px / min_face if min_face > 0 and face_px > 0 else math.inf


class FaceAnalysis:
    """A detector and where the landmarks come from. With `min_face` (source pixels), frames are read at the
    scale that finds faces of that size (`detect.face_px`), not smaller ones."""

    def __init__(self, cfg: DetectConfig, models_dir: Path, device: str = "cpu", backend: str = "auto",
                 min_face: int = 0):
        self.detector, self.spec, path = create_detector(cfg, models_dir, device, backend)
        self.min_size, self.refine_px, self.batch, self.face_px = cfg.min_size, cfg.refine_px, cfg.batch, cfg.face_px
        self.face_scale = _face_scale(cfg.face_px, min_face)
        use_mesh = cfg.landmarks == "mesh" or (cfg.landmarks == "auto" and not self.spec.keypoints)
        if cfg.landmarks == "keypoints" and not self.spec.keypoints:
            raise InputError(f"detect.landmarks = keypoints: the {self.spec.name} detector gives no keypoints")
        self.mesher = FaceMesher() if use_mesh else None
        self.files: dict[str, tuple[str, Path]] = {}
        if path is not None:
            self.files["face_detector"] = (self.spec.name, path)
        if self.mesher is not None:
            self.files["face_mesh"] = ("mediapipe face_mesh", self.mesher.model_file())

    def for_min_face(self, min_face: int) -> "FaceAnalysis":
        """The same detector and landmarks (shared, not copied), reading frames at the scale for `min_face`."""
        other = copy.copy(self)
        other.face_scale = _face_scale(self.face_px, min_face)
        return other

    def joined(self, max_batch: int) -> "FaceAnalysis":
        """The same, for many threads at once (`serve`'s cameras): the detector's calls that arrive while it is busy
        are joined into one (`batching.JoinedEngine`: frames of one size, or crops of one size). Detectors that
        run on OpenCV or mediapipe are shared as they are."""
        engine = getattr(self.detector, "engine", None)
        if engine is None:
            return self
        other = copy.copy(self)
        other.detector = copy.copy(self.detector)
        other.detector.engine = JoinedEngine(engine, max_batch)
        return other

    @classmethod
    def configured(cls, **detect) -> "FaceAnalysis":
        """The default configuration's face analysis on CPU, with `detect` overriding [detect] keys."""
        from .config import load_config
        from .models import default_models_dir

        return cls(load_config(overrides={"detect": detect}).detect, default_models_dir())

    @property
    def name(self) -> str:
        return self.spec.name + ("+mesh" if self.mesher is not None else "")

    def detect(self, frames: Sequence[VideoFrame | np.ndarray], fine: bool = False) -> list[Detections]:
        """Faces in decoded frames or RGB images (all of one size), each scaled to the detector's size on its own
        (a decoded frame without converting it whole). `fine` reads them at the detector's largest size, whatever
        `min_face`: for photos, whose keypoints matter more than the time."""
        frames = [f if isinstance(f, VideoFrame) else VideoFrame(0, 0.0, f) for f in frames]
        if not frames:
            return []
        scale = self.scale(frames[0], fine)
        return self.detector.detect([f.scaled(scale) for f in frames], scale)

    def prepare(self, frame: VideoFrame) -> None:
        """Make (and keep in `frame`) the detector's input for `frame`, where the detector reads scaled frames."""
        if self.detector.size is not None:
            frame.scaled(self.scale(frame))

    def scale(self, frame: VideoFrame, fine: bool = False) -> float:
        """The scale the detector reads `frame` at."""
        return input_scale(*frame.size, self.detector.size, self.min_size, math.inf if fine else self.face_scale)

    def __call__(self, frame: VideoFrame | np.ndarray) -> Detections:
        return self.detect([frame])[0]

    @property
    def revisits(self) -> bool:
        """Whether a tracked face can be found again on a crop around it (`around`): a detector with keypoints,
        which reads crops of any size."""
        return self.spec.keypoints and self.refine_px > 0

    def landmarks(self, frame: VideoFrame | np.ndarray, dets: Detections, i: int, fine: bool = False,
                  refine: bool = True) -> FaceLandmarks | None:
        """The 5 points and outline of face `i` of `dets` (found in `frame`), or None when the mesh finds no face
        there. With `refine`, keypoints found on a face smaller than `detect.refine_px` at the detection scale are
        found again on the face alone, at that size."""
        frame = frame if isinstance(frame, VideoFrame) else VideoFrame(0, 0.0, frame)
        if self.mesher is not None:
            return self.mesher(frame.image, dets.xyxy[i])
        five = dets.five[i]
        if refine and self.refine_px and dets.side[i] * self.scale(frame, fine) < self.refine_px:
            found = self.around(frame, dets.xyxy[i:i + 1], min_iou=REFINE_IOU)[0]
            five = found.five[0] if len(found) else five
        return keypoint_landmarks(five)

    def around(self, frame: VideoFrame, boxes: np.ndarray, min_iou: float) -> list[Detections]:
        """The faces in `boxes` (N, 4) found again, each on a crop twice its box's side with the face at `refine_px`
        (never enlarged), in one detector call: keypoints at that precision, or tracked faces found again between
        full-frame detections. Per box one row in source pixels, the crop's face that overlaps the box most, if by
        `min_iou`; else none."""
        sides = boxes[:, 2] - boxes[:, 0]
        scales = np.minimum(1.0, self.refine_px / sides)
        origins = (boxes[:, :2] + boxes[:, 2:]) / 2 - sides[:, None]   # each crop's top left, in source pixels
        out = max(32, round(float((2 * sides * scales).max())))        # one size for the batch
        crops = []
        for origin, side, r in zip(origins, sides, scales):
            patch, at = frame.region(np.concatenate([origin, origin + 2 * side]))
            warp = np.array([[r, 0, -r * (origin[0] - at[0])], [0, r, -r * (origin[1] - at[1])]], np.float32)
            crops.append(cv2.warpAffine(patch, warp, (out, out), flags=cv2.INTER_LINEAR))   # (no area mode)
        results = []
        found_all = [d for i in range(0, len(crops), self.batch) for d in self.detector.detect(crops[i:i + self.batch])]
        for found, box, origin, r in zip(found_all, boxes, origins, scales):
            found = found[found.has_points]
            iou = box_iou(found.xyxy, ((box - np.tile(origin, 2)) * r)[None].astype(np.float32))[:, 0]
            j = int(np.argmax(iou)) if len(found) else 0
            if not len(found) or iou[j] < min_iou:
                results.append(found[np.zeros(len(found), bool)])
                continue
            results.append(Detections((found.xyxy[j:j + 1] / r + np.tile(origin, 2)).astype(np.float32),
                                      found.confidence[j:j + 1], (found.five[j:j + 1] / r + origin).astype(np.float32)))
        return results

    def largest(self, image: np.ndarray) -> tuple[Detections, FaceLandmarks | None]:
        """The largest face of a photo and its landmarks (an empty `Detections` when there is none)."""
        dets = self.detect([image], fine=True)[0]
        if not len(dets):
            return dets, None
        i = int(np.argmax(dets.side))
        return dets[i], self.landmarks(image, dets, i, fine=True)

    def close(self) -> None:
        self.detector.close()
        if self.mesher is not None:
            self.mesher.close()


@dataclass(frozen=True)
class EndedTrack:
    track_id: int
    span: tuple[float, float]   # first and last time it was detected
    real: bool                  # detected often enough to be a face (or the input was too short to tell)


@dataclass(frozen=True)
class Analysed:
    """What one frame gives the scoring stages: the tracks that ended before it, and its faces to score."""

    ended: tuple[EndedTrack, ...] = ()
    faces: tuple[ScoredFace, ...] = ()


Found = tuple[int, Detections, int, bool]   # track id, a frame's detections, the face's index, found again around it


class DetectAhead:
    """Full-frame detection, with the next `ahead` detection frames (every `stride`-th) read in one detector call
    (batched over frames, as a GPU runs them best) and the frames between held until then. A frame's faces depend
    on that frame alone, so they are what a call per frame finds."""

    def __init__(self, faces: FaceAnalysis, stride: int, ahead: int, timer):
        self.faces, self.stride, self.ahead, self.timer = faces, stride, max(1, ahead), timer
        self.found: dict[int, Detections] = {}   # frame index -> its faces, detected ahead

    @property
    def held(self) -> int:
        """The most frames `frames` holds at once."""
        return self.ahead * self.stride if self.ahead > 1 else 0

    def frames(self, frames: Iterator[VideoFrame]) -> Iterator[VideoFrame]:
        """`frames` as they come; with `ahead` > 1, in groups that end at every `ahead`-th detection frame, whose
        detection frames are read in one call before the group is handed on. A decoding error is raised after
        the frames before it, as `frames` raises it."""
        group: list[VideoFrame] = []
        due = 0
        frames = iter(frames)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except Exception:
                yield from self._handed(group)
                raise
            group.append(frame)
            due += not frame.index % self.stride
            if self.ahead == 1 or due == self.ahead:
                yield from self._handed(group)
                group, due = [], 0
        yield from self._handed(group)

    def _handed(self, group: list[VideoFrame]) -> Iterator[VideoFrame]:
        due = [f for f in group if not f.index % self.stride]
        if len(due) > 1 and len({f.size for f in due}) == 1:   # else a call per frame does as well
            with self.timer("detect"):
                self.found.update(zip((f.index for f in due), self.faces.detect(due)))
        yield from group

    def take(self, frame: VideoFrame) -> Detections:
        """`frame`'s faces: detected ahead, or now."""
        dets = self.found.pop(frame.index, None)
        if dets is None:
            with self.timer("detect"):
                dets = self.faces(frame)
        return dets


class Analyser:
    """The analysis stage: detect, track, gate, landmarks, crops and capture measures. Frames go in; frozen
    `Analysed` records come out. Its counters say why faces were not scored.

    The whole frame is searched every `stride` frames (`detect.rate`): that finds new faces and feeds the tracker.
    Between, each tracked face due for a sample (`cascade.sample_interval`) is found again on a crop around its
    latest box, at `detect.refine_px` (`FaceAnalysis.around`): faces are sampled as often as before for a fraction
    of the detector's time."""

    def __init__(self, cfg: Config, faces: FaceAnalysis, fps: float, timer, live: bool = False):
        self.cfg, self.faces, self.timer = cfg, faces, timer
        self.stride = 1 if cfg.cascade.exhaustive else detection_stride(fps, cfg.detect.rate)
        # detect.ahead's 0: a batch where every frame is detected
        self.full_frame = DetectAhead(faces, self.stride, cfg.detect.ahead or (
            cfg.detect.batch if self.stride == 1 and not live else 1), timer)
        self.tracker = FaceTracker(cfg.track, fps)
        self.interval = 0.0 if cfg.cascade.exhaustive else cfg.cascade.sample_interval
        self.counts: dict[str, int] = defaultdict(int)
        self.last_sampled: dict[int, float] = {}
        self.span: dict[int, tuple[float, float]] = {}   # open track -> (first, last) time it was detected
        self.detect_passes = 0
        self.largest_face = 0.0
        self.cut_frames: deque[int] = deque(maxlen=1000)   # the latest cuts' frame indices, for the summary

    def prepare(self, frame: VideoFrame) -> None:
        """What the decoding thread makes for `frame` ahead of `__call__` (`decode.Prepare`): the shot-cut
        thumbnail, and on full-frame detection frames the detector's input. It reads only settings."""
        if self.tracker.cuts is not None:
            frame.thumbnail   # noqa: B018 - made and kept by the frame
        if not frame.index % self.stride:
            self.faces.prepare(frame)

    def __call__(self, frame: VideoFrame) -> Analysed:
        self.counts["frames"] += 1
        ended: list[EndedTrack] = []
        with self.timer("track"):
            cut = self.tracker.check_cut(frame)
        if cut:
            self.cut_frames.append(frame.index)
            ended += self._ended(self.tracker.finish(), frame.pts_time)
        found = self._revisit(frame) if frame.index % self.stride else None
        if found is None:
            found, gone = self._discover(frame)
            ended += gone
        faces = []
        for tid, dets, i, revisited in found:
            self.span[tid] = (self.span.get(tid, (frame.pts_time,))[0], frame.pts_time)
            why = self._gate(tid, float(dets.side[i]), float(dets.confidence[i]), frame.pts_time)
            if why is None:
                self.last_sampled[tid] = frame.pts_time
                face = self._face(frame, dets, i, tid, refine=not revisited)
                why = face if isinstance(face, str) else None
            if why is not None:
                self.counts[f"gate_{why}"] += 1
            else:
                faces.append(face)
        return Analysed(tuple(ended), tuple(faces))

    def _discover(self, frame: VideoFrame) -> tuple[list[Found], list[EndedTrack]]:
        """A full-frame detection and tracker update: the tracked faces (track, detections, index), and the
        tracks that ended."""
        dets = self.full_frame.take(frame)
        self.detect_passes += 1
        self.counts["faces_detected"] += len(dets)
        if len(dets):
            self.largest_face = max(self.largest_face, float(dets.side.max()))
        with self.timer("track"):
            update = self.tracker.update(dets, frame.pts_time)
        found = [(int(update.track_ids[i]), dets, int(i), False) for i in np.flatnonzero(update.track_ids >= 0)]
        return found, self._ended(update.ended, frame.pts_time)

    def _revisit(self, frame: VideoFrame) -> list[Found] | None:
        """Between full-frame detections: each tracked face due for a sample, found again on a crop around its
        latest box (`FaceAnalysis.around`). None where a full-frame detection is the cheaper way (more crop pixels
        than the frame's detection input), or the only one (a detector without keypoints)."""
        due = {tid: box for tid, box in self.tracker.boxes.items()
               if frame.pts_time - self.last_sampled.get(tid, -math.inf) >= self.interval
               and box[2] - box[0] >= self.cfg.faces.min_face}
        if not due:
            return []
        w, h = frame.size
        if not self.faces.revisits or len(due) * (2 * self.faces.refine_px) ** 2 > w * h * self.faces.scale(frame) ** 2:
            return None
        with self.timer("detect"):
            again = self.faces.around(frame, np.stack(list(due.values())), min_iou=REVISIT_IOU)
        self.counts["faces_revisited"] += len(due)
        found = []
        for tid, dets in zip(due, again):
            if len(dets):
                self.tracker.seen(tid, dets.xyxy[0], frame.pts_time)
                found.append((tid, dets, 0, True))
            else:
                self.tracker.lost(tid)
        return found

    def finish(self, now: float) -> tuple[EndedTrack, ...]:
        """End every open track (end of input)."""
        return tuple(self._ended(self.tracker.finish(), now, at_end=True))

    def _ended(self, track_ids, now: float, at_end: bool = False) -> list[EndedTrack]:
        # An input with fewer detection passes than track.min_frames (a still image, a one-frame clip) could
        # never keep a face: there, one detection is enough.
        short_input = at_end and self.detect_passes < self.cfg.track.min_frames
        out = []
        for tid in track_ids:
            self.last_sampled.pop(tid, None)
            out.append(EndedTrack(tid, self.span.pop(tid, (now, now)), self.tracker.is_real(tid) or short_input))
        return out

    def _gate(self, tid: int, side: float, det_score: float, pts: float) -> str | None:
        """Why a tracked face is not scored, or None."""
        if side < self.cfg.faces.min_face:
            return "too_small"
        if det_score < self.cfg.cascade.min_det_score:
            return "low_det_score"
        if pts - self.last_sampled.get(tid, -math.inf) < self.interval:
            return "sampled_out"
        return None

    def _face(self, frame: VideoFrame, dets: Detections, i: int, tid: int, refine: bool) -> ScoredFace | str:
        """The face to score, or why it is not scored (no landmarks, turned too far, too blurred)."""
        cfg = self.cfg
        with self.timer("landmarks"):
            lm = self.faces.landmarks(frame, dets, i, refine=refine)
        if lm is None:
            return "no_landmarks"
        yaw = yaw_ratio(lm.five)
        if abs(yaw) > cfg.cascade.max_yaw or in_profile(lm.five, float(dets.side[i])):
            return "yaw"
        with self.timer("align"):
            # Only the part of the frame the crops read is converted: the context crop, and the aligned crop
            # turned by up to 45 degrees.
            box = dets.xyxy[i]
            half = float(box[2] - box[0]) * max(1.0, cfg.output.context_scale / 2)
            centre = (box[:2] + box[2:]) / 2
            patch, origin = frame.region(np.concatenate([centre - half, centre + half]))
            box, local = box - np.tile(origin, 2), lm.shifted(origin)
            crops = crop_face(patch, box, local, cfg.faces.aligned_size, cfg.faces.iqa_size, cfg.output.context_scale)
        with self.timer("measures"):
            capture = measure(patch, box, crops.aligned, local.five, local.mesh)
        if capture.sharpness < cfg.cascade.min_sharpness:
            return "blur"
        return ScoredFace(
            track_id=tid, frame_index=frame.index, pts_time=frame.pts_time, bbox=dets.xyxy[i],
            det_score=float(dets.confidence[i]), landmarks=lm.five, serfiq=math.nan, embedding=None,
            iqa=None, score=math.nan, sharpness=capture.sharpness, proxy=capture.detail, yaw=yaw, crops=crops,
            measures=capture, pose=pose_bin(yaw, cfg.diversity.frontal_yaw))


def nothing_kept(analyser: Analyser) -> str:
    """One line on why a run kept no face."""
    c, frames = analyser.counts, analyser.counts["frames"]
    if not c["faces_detected"]:
        return f"no face kept: no face was detected in {frames} frame(s)"
    gates = {"too_small": f"smaller than --min-face {analyser.cfg.faces.min_face} px "
                          f"(the largest was {analyser.largest_face:.0f} px)",
             "low_det_score": "under cascade.min_det_score", "no_landmarks": "without landmarks",
             "yaw": "turned too far (cascade.max_yaw)", "blur": "too blurred (cascade.min_sharpness)"}
    why = [f"{c[f'gate_{g}']} {text}" for g, text in gates.items() if c[f"gate_{g}"]]
    return (f"no face kept: {c['faces_detected']} face detection(s) in {frames} frame(s); not scored: "
            + ("; ".join(why) if why else "none, but every scored face failed the SER-FIQ rule or was in a "
                                          "track too short to keep (track.min_frames)"))
