"""A real RTSP server for the tests: GStreamer's rtsp-server serving a video file at rtsp://127.0.0.1:PORT/stream.

Run with Debian's /usr/bin/python3 (it has the `gi` bindings): `rtsp_server.py PORT FILE [CERT KEY USER PASSWORD]`
(with a PEM certificate and key, and a user, it serves rtsps:// to that user alone). The file's H.264 stream is
paid out as it is, paced in real time, with SPS/PPS at every key frame; no re-encoding, so the server costs little
CPU next to the pipeline under test. Each new session starts at the beginning of the file. Prints "ready" once it
listens.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> None:
    port, path = sys.argv[1], sys.argv[2]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    factory = GstRtspServer.RTSPMediaFactory()
    if len(sys.argv) > 6:   # rtsps:// with basic authentication: CERT KEY (PEM) USER PASSWORD
        from gi.repository import Gio

        auth = GstRtspServer.RTSPAuth()
        auth.set_tls_certificate(Gio.TlsCertificate.new_from_files(sys.argv[3], sys.argv[4]))
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(sys.argv[5], sys.argv[6]), token)
        server.set_auth(auth)
        factory.add_role_from_structure(Gst.Structure.from_string(
            "viewer, media.factory.access=(boolean)true, media.factory.construct=(boolean)true")[0])
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory.set_launch(
        f'( filesrc location="{path}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1 )')
    factory.set_shared(True)
    server.get_mount_points().add_factory("/stream", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
