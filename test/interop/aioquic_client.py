# A client of the relay written from DESIGN.md's wire protocol alone, on
# another QUIC stack (aioquic, Python), against the relay binary.
# usage: python3 aioquic_client.py PORT TOKEN
import asyncio, datetime, os, ssl, struct, sys, tempfile, msgpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived, StreamReset

def frame(m):
    b = msgpack.packb(m, use_bin_type=True)
    return struct.pack(">I", len(b)) + b

class Node(QuicConnectionProtocol):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.ctl = b""; self.msgs = asyncio.Queue(); self.streams = {}; self.tunnels = asyncio.Queue()
    def quic_event_received(self, ev):
        if isinstance(ev, StreamDataReceived):
            if ev.stream_id == 0:
                self.ctl += ev.data
                while len(self.ctl) >= 4:
                    n = struct.unpack(">I", self.ctl[:4])[0]
                    if len(self.ctl) < 4 + n: break
                    self.msgs.put_nowait(msgpack.unpackb(self.ctl[4:4+n], raw=False)); self.ctl = self.ctl[4+n:]
            else:
                st = self.streams.setdefault(ev.stream_id, {"buf": b"", "tid": None, "end": False})
                st["buf"] += ev.data; st["end"] = st["end"] or ev.end_stream
                if st["tid"] is None and len(st["buf"]) >= 32:
                    st["tid"] = st["buf"][:32].decode(); st["buf"] = st["buf"][32:]
                    self.tunnels.put_nowait((st["tid"], ev.stream_id))
        elif isinstance(ev, StreamReset):
            self.streams.setdefault(ev.stream_id, {"buf": b"", "tid": None, "end": False})["reset"] = True
    def send_ctl(self, m):
        self._quic.send_stream_data(0, frame(m)); self.transmit()
    async def next(self):
        return await asyncio.wait_for(self.msgs.get(), 10)

results = []

def check(name, got, want):
    ok = got == want
    results.append(ok)
    print(("ok    " if ok else "FAIL  ") + name + ("" if ok else f": got {got!r}, want {want!r}"))

async def main(port, token):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["macula-dist"], verify_mode=ssl.CERT_NONE)
    async with connect("127.0.0.1", port, configuration=cfg, create_protocol=Node) as a, \
               connect("127.0.0.1", port, configuration=cfg, create_protocol=Node) as b:
        a.send_ctl({"t": "tun_req", "target": "b@py"})
        check("tunnel request before identify", await a.next(), {"t": "tun_err", "r": "not_identified"})
        a.send_ctl({"t": "bogus"})
        check("unknown type", await a.next(), {"t": "err", "r": "unknown_type"})
        a.send_ctl({"t": "id", "n": "a@py", "tok": token})
        check("identify a", await a.next(), {"t": "id_ok"})
        b.send_ctl({"t": "id", "n": "b@py", "tok": token})
        check("identify b", await b.next(), {"t": "id_ok"})
        a.send_ctl({"t": "tun_req", "target": "nobody@py"})
        check("missing target", await a.next(), {"t": "tun_err", "r": "target_not_connected"})
        a.send_ctl({"t": "tun_req", "target": "a@py"})
        check("tunnel to self", await a.next(), {"t": "tun_err", "r": "self_tunnel"})
        for src, dst, dname in [(a, b, "b@py"), (b, a, "a@py")]:
            src.send_ctl({"t": "tun_req", "target": dname})
            ok = await src.next(); note = await dst.next()
            tid_s, sid_s = await asyncio.wait_for(src.tunnels.get(), 10)
            tid_d, sid_d = await asyncio.wait_for(dst.tunnels.get(), 10)
            check("tun_ok, tun_notify and both prefixes name one tunnel",
                  (ok["t"], note["t"], note["src"], ok["tid"], note["tid"], tid_s),
                  ("tun_ok", "tun_notify", src is a and "a@py" or "b@py", tid_d, tid_d, tid_d))
            payload = bytes(range(256)) * 4096  # 1 MiB
            src._quic.send_stream_data(sid_s, payload, end_stream=True); src.transmit()
            dst._quic.send_stream_data(sid_d, b"pong", end_stream=True); dst.transmit()
            for _ in range(200):
                if dst.streams[sid_d]["end"] and src.streams.get(sid_s, {}).get("end"): break
                await asyncio.sleep(0.05)
            check("1 MiB through the tunnel, intact", dst.streams[sid_d]["buf"] == payload, True)
            check("reply the other way", src.streams[sid_s]["buf"], b"pong")
    cfg2 = QuicConfiguration(is_client=True, alpn_protocols=["macula-dist"], verify_mode=ssl.CERT_NONE)
    async with connect("127.0.0.1", port, configuration=cfg2, create_protocol=Node) as c:
        c.send_ctl({"t": "id", "n": "c@py", "tok": "wrong"})
        check("wrong token", await c.next(), {"t": "id_err", "r": "bad_token"})
    async with connect("127.0.0.1", port, configuration=cfg2, create_protocol=Node) as d:
        d._quic.send_stream_data(0, b"\xff\xff\xff\xff"); d.transmit()
        check("4 GiB length", await d.next(), {"t": "err", "r": "frame_too_large"})

def client_key(dir, name):
    """A P-256 key and a self-signed certificate for it, as PEM files: the
    node's own key, which it shows the relay in the QUIC handshake."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    paths = (os.path.join(dir, name + ".crt"), os.path.join(dir, name + ".key"))
    with open(paths[0], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths

def keyed(paths):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["macula-dist"], verify_mode=ssl.CERT_NONE)
    cfg.load_cert_chain(*paths)
    return cfg

async def names_owned_by_keys(port, token):
    # (the holder's close on leaving its block sends nothing and waits for nothing)
    """A live name belongs to the key that holds it: another key gets
    name_taken and the holder keeps its connection; once the holder stops
    answering, its own key takes the name back (a restart) and another key
    still cannot."""
    with tempfile.TemporaryDirectory() as dir:
        k1, k2 = client_key(dir, "k1"), client_key(dir, "k2")
        async with connect("127.0.0.1", port, configuration=keyed(k1), create_protocol=Node) as holder:
            holder.send_ctl({"t": "id", "n": "k@py", "tok": token, "v": 2})
            check("keyed identify", (await holder.next())["t"], "id_ok")
            async with connect("127.0.0.1", port, configuration=keyed(k2), create_protocol=Node) as other:
                other.send_ctl({"t": "id", "n": "k@py", "tok": token, "v": 2})
                check("another key: live name refused", await other.next(), {"t": "id_err", "r": "name_taken"})
            holder.send_ctl({"t": "tun_req", "target": "nobody@py"})
            check("the holder keeps its connection", await holder.next(),
                  {"t": "tun_err", "r": "target_not_connected"})
            # The holder goes silent (no CONNECTION_CLOSE): as a node killed.
            holder._transport.close()
            holder.transmit = lambda: None
            holder.wait_closed = lambda: asyncio.sleep(0)  # nothing more to wait for
            async with connect("127.0.0.1", port, configuration=keyed(k2), create_protocol=Node) as other:
                other.send_ctl({"t": "id", "n": "k@py", "tok": token, "v": 2})
                check("another key: a silent holder's name still refused", await other.next(),
                      {"t": "id_err", "r": "name_taken"})
            async with connect("127.0.0.1", port, configuration=keyed(k1), create_protocol=Node) as again:
                again.send_ctl({"t": "id", "n": "k@py", "tok": token, "v": 2})
                check("the same key replaces its silent connection", (await again.next())["t"], "id_ok")

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
asyncio.run(names_owned_by_keys(int(sys.argv[1]), sys.argv[2]))
failed = results.count(False)
print(f"interop: {len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
