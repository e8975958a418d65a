"""Decoded frames converted in part (`VideoFrame.region`), and tracked faces found again on a crop around them
(`FaceAnalysis.around`) between full-frame detections, on the real 1080p street clip."""

import av
import numpy as np
import pytest

from cafi_stream.decode import VideoFrame
from cafi_stream.detect import box_iou
from conftest import SHARED, face_analysis

STREET = SHARED / "real" / "videos" / "street_1080p_multiface.mp4"


@pytest.fixture(scope="module")
def street():
    """Frames 0-39 of the street clip, as decoded (4:2:0)."""
    with av.open(str(STREET)) as c:
        return [f for _, f in zip(range(40), c.decode(video=0))]


def test_a_region_is_the_whole_frame_cut(street):
    raw = street[0]
    assert raw.format.name == "yuv420p"
    whole = VideoFrame(0, 0.0, raw).image
    assert np.abs(whole.astype(int) - raw.to_ndarray(format="rgb24")).mean() < 3   # OpenCV's and swscale's BT.601
    for box in [(100.3, 201.7, 333.2, 411.9), (1850.0, 1000.0, 2100.0, 1300.0), (-60.0, -20.0, 37.0, 41.0)]:
        patch, origin = VideoFrame(0, 0.0, raw).region(box)   # a fresh frame: converted from its planes alone
        x0, y0 = origin.astype(int)
        assert x0 % 8 == 0 and y0 % 8 == 0 and x0 <= max(box[0], 0) and y0 <= max(box[1], 0)
        assert x0 + patch.shape[1] >= min(box[2], 1920) and y0 + patch.shape[0] >= min(box[3], 1080)
        np.testing.assert_array_equal(patch, whole[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]])


def test_the_thumbnail_area_averages_every_third_pixel_of_each_plane(street):
    """A 1080p frame's shot-cut thumbnail reads every 3rd pixel of its planes (made with OpenCV's nearest-neighbour
    resize, not numpy's strided copy): the same pixels as the plain slices, so the cut rule sees the same image."""
    import cv2

    raw = street[5]
    planes = [np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:p.height, :p.width] for p in raw.planes]
    small = [cv2.resize(np.ascontiguousarray(p[::3, ::3]), size, interpolation=cv2.INTER_AREA).ravel()
             for p, size in zip(planes, ((64, 36), (32, 18), (32, 18)))]
    expected = cv2.cvtColor(np.concatenate(small).reshape(54, 64), cv2.COLOR_YUV2RGB_I420)
    np.testing.assert_array_equal(VideoFrame(5, 0.0, raw).thumbnail, expected)


def test_a_tracked_face_is_found_again_around_its_last_box(street):
    """Faces detected in frame 0 are found again around those boxes 3 frames (0.1 s, the default sampling
    interval) later, while the people walk, where the full-frame detection of that frame puts them, with the same
    keypoints; around a box of background, nothing is found."""
    analysis = face_analysis()
    try:
        first = analysis(VideoFrame(0, 0.0, street[0]))
        later = VideoFrame(3, 0.0, street[3])
        fine = analysis.detect([later], fine=True)[0]   # the reference: the whole frame at the detector's size
        # The faces of frame 0 whose box still overlaps their own in frame 3 by half (two people cross the frame
        # faster: they wait for the next full-frame detection).
        overlap = box_iou(first.xyxy, fine.xyxy)
        slow = [i for i in range(len(first)) if first.side[i] >= 60 and overlap[i].max() >= 0.5]
        assert len(slow) >= 3
        for i, found in zip(slow, analysis.around(later, first.xyxy[slow], min_iou=0.3)):   # one batch
            assert len(found) == 1
            j = int(np.argmax(overlap[i]))
            assert box_iou(found.xyxy, fine.xyxy[j:j + 1])[0, 0] > 0.7
            error = np.linalg.norm(found.five[0] - fine.five[j], axis=1).max() / fine.side[j]
            assert error < 0.08, error
        sky = np.array([900, 0, 1000, 100], np.float32)   # the top of the street scene: buildings, no face
        assert not box_iou(sky[None], fine.xyxy).any()
        assert len(analysis.around(later, sky[None], min_iou=0.3)[0]) == 0
    finally:
        analysis.close()


def test_a_callers_stop_ends_a_decoder_but_a_decoder_that_ends_does_not_look_stopped():
    """`stop` links a caller's event to a decoder one way: a file read to its end leaves the caller's event unset
    (serve would take a camera that failed for one that was stopped), and setting it ends a looped live source."""
    import threading

    from cafi_stream.decode import Decoder
    from cafi_stream.live import LiveDecoder, LiveOptions
    from conftest import VIDEO

    stop = threading.Event()
    assert sum(1 for _ in Decoder(str(VIDEO), stop=stop).frames()) == 275
    assert not stop.is_set()
    live = LiveDecoder(str(VIDEO), options=LiveOptions(loop=True), stop=stop)
    seen = 0
    for _ in live.frames():
        seen += 1
        if seen == 5:
            stop.set()
    assert 5 <= seen < 275
