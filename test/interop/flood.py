# A token holder without the cookie floods a node with e2e sessions that
# never start: tun_req to the target, then tun_close as soon as tun_ok
# names the tunnel, as fast as the relay answers, for a while.
#
# usage: python3 flood.py PORT TARGET SECONDS [TOKEN]
# Prints "requested N closed M refused K" when done.
import asyncio, ssl, struct, sys, time
import msgpack
from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived

def frame(m):
    b = msgpack.packb(m, use_bin_type=True)
    return struct.pack(">I", len(b)) + b

class Flooder(QuicConnectionProtocol):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.ctl = b""
        self.msgs = asyncio.Queue()

    def quic_event_received(self, ev):
        if isinstance(ev, StreamDataReceived) and ev.stream_id == 0:
            self.ctl += ev.data
            while len(self.ctl) >= 4:
                n = struct.unpack(">I", self.ctl[:4])[0]
                if len(self.ctl) < 4 + n:
                    break
                self.msgs.put_nowait(msgpack.unpackb(self.ctl[4:4 + n], raw=False))
                self.ctl = self.ctl[4 + n:]

    def send_ctl(self, m):
        self._quic.send_stream_data(0, frame(m))

async def main(port, target, seconds, token):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["macula-dist"],
                            verify_mode=ssl.CERT_NONE, max_data=1 << 26,
                            max_stream_data=1 << 26)
    async with connect("127.0.0.1", port, configuration=cfg, create_protocol=Flooder) as c:
        ident = {"t": "id", "n": "flooder@h", "v": 3}
        if token:
            ident["tok"] = token
        c.send_ctl(ident)
        c.transmit()
        first = await asyncio.wait_for(c.msgs.get(), 10)
        assert first.get("t") == "id_ok", first
        requested = closed = refused = 0
        outstanding = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            while outstanding < 200:
                c.send_ctl({"t": "tun_req", "target": target, "mode": "e2e"})
                requested += 1
                outstanding += 1
            c.transmit()
            try:
                m = await asyncio.wait_for(c.msgs.get(), 5)
            except asyncio.TimeoutError:
                break
            while True:
                if m.get("t") == "tun_ok":
                    c.send_ctl({"t": "tun_close", "tid": m["tid"]})
                    closed += 1
                    outstanding -= 1
                elif m.get("t") == "tun_err":
                    refused += 1
                    outstanding -= 1
                if c.msgs.empty():
                    break
                m = c.msgs.get_nowait()
        print(f"requested {requested} closed {closed} refused {refused}", flush=True)

asyncio.run(main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]),
                 sys.argv[4] if len(sys.argv) > 4 else None))
