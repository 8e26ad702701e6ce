# A hostile relay, written on another QUIC stack (aioquic), for the
# security suite. It speaks the control protocol of DESIGN.md and tries to
# make a node carry distribution where the relay can read and write it.
#
# usage: python3 fake_relay.py MODE PORT_FILE
#   v1      answers id_ok without `v` (a relay of protocol v1 only): an e2e
#           node must refuse it.
#   inject  answers id_ok with v3, then announces an inbound *stream*
#           tunnel from mallory@h (tun_notify without bind) and opens the
#           tunnel's stream with its prefix and a distribution send_name:
#           an e2e node must refuse the tunnel (tun_close) and never answer
#           on the stream.
# It writes "PORT FINGERPRINT" to PORT_FILE once listening, then one line
# per event on stdout: `connected`, `identified NAME`, `closed`,
# `tun_close TID`, `stream_data N`.
import asyncio, datetime, hashlib, os, secrets, struct, sys, tempfile
import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from aioquic.asyncio import serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived

MODE = sys.argv[1]

def say(line):
    print(line, flush=True)

def frame(m):
    b = msgpack.packb(m, use_bin_type=True)
    return struct.pack(">I", len(b)) + b

class FakeRelay(QuicConnectionProtocol):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.ctl = b""
        self.tunnel_stream = None
        say("connected")

    def send_ctl(self, m):
        self._quic.send_stream_data(0, frame(m))
        self.transmit()

    def quic_event_received(self, ev):
        if isinstance(ev, ConnectionTerminated):
            say("closed")
        elif isinstance(ev, StreamDataReceived) and ev.stream_id == 0:
            self.ctl += ev.data
            while len(self.ctl) >= 4:
                n = struct.unpack(">I", self.ctl[:4])[0]
                if len(self.ctl) < 4 + n:
                    break
                self.on_control(msgpack.unpackb(self.ctl[4:4 + n], raw=False))
                self.ctl = self.ctl[4 + n:]
        elif isinstance(ev, StreamDataReceived) and ev.stream_id == self.tunnel_stream:
            if ev.data:
                say(f"stream_data {len(ev.data)}")

    def on_control(self, m):
        t = m.get("t")
        if t == "id":
            say(f"identified {m.get('n')}")
            if MODE == "v1":
                self.send_ctl({"t": "id_ok"})
            else:
                self.send_ctl({"t": "id_ok", "v": 3})
                asyncio.get_event_loop().call_later(0.3, self.inject)
        elif t == "tun_close":
            say(f"tun_close {m.get('tid')}")

    def inject(self):
        tid = secrets.token_hex(16)
        self.send_ctl({"t": "tun_notify", "tid": tid, "src": "mallory@h"})
        sid = self._quic.get_next_available_stream_id(is_unidirectional=False)
        self.tunnel_stream = sid
        name = b"mallory@h"
        packet = b"N" + struct.pack(">QIH", 0x1ffffff, 1, len(name)) + name
        self._quic.send_stream_data(sid, tid.encode() + struct.pack(">H", len(packet)) + packet)
        self.transmit()
        say(f"injected {tid}")

def self_signed(dir):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-relay")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(dir, "cert.pem"), os.path.join(dir, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return cert_path, key_path, fingerprint

async def main(port_file):
    dir = tempfile.mkdtemp()
    cert, key, fingerprint = self_signed(dir)
    cfg = QuicConfiguration(is_client=False, alpn_protocols=["macula-dist"])
    cfg.load_cert_chain(cert, key)
    server = await serve("127.0.0.1", 0, configuration=cfg, create_protocol=FakeRelay)
    port = server._transport.get_extra_info("sockname")[1]
    with open(port_file + ".tmp", "w") as f:
        f.write(f"{port} {fingerprint}\n")
    os.rename(port_file + ".tmp", port_file)
    # Bounded: the suite kills it sooner.
    await asyncio.sleep(120)

asyncio.run(main(sys.argv[2]))
