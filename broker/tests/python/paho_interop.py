#!/usr/bin/env python3
"""Drives a running ferrymq broker with Eclipse Paho (paho-mqtt 2.x) over MQTT 3.1.1 and 5.0.

Usage: paho_interop.py <port> [host]

Exits 0 when every check passed, 1 on the first failed check, 2 on bad usage and 3 when
paho-mqtt 2.x is not installed. Run by `cargo test --test interop`.
"""

import queue
import sys
import threading
import time
import uuid

try:
    import paho.mqtt
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
except ImportError as e:  # pragma: no cover - environment problem
    print(f"paho-mqtt 2.x is required ({e}); install with "
          "`pip install -r broker/tests/python/requirements.txt`", file=sys.stderr)
    sys.exit(3)

if int(paho.mqtt.__version__.split(".")[0]) < 2:
    print(f"paho-mqtt {paho.mqtt.__version__} found, 2.x required; install with "
          "`pip install -r broker/tests/python/requirements.txt`", file=sys.stderr)
    sys.exit(3)

WAIT = 10.0
QUIET = 0.5
HOST = "127.0.0.1"
PORT = 0
RUN = uuid.uuid4().hex[:8]


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


class Peer:
    """One paho client with its callbacks turned into queues and events."""

    def __init__(self, version, client_id, clean=True, expiry=None, will=None):
        self.version = version
        self.clean = clean
        self.expiry = expiry
        self.messages = queue.Queue()
        self.subacks = queue.Queue()
        self.connack = queue.Queue()
        kwargs = {}
        if version == 5:
            kwargs["protocol"] = mqtt.MQTTv5
        else:
            kwargs["protocol"] = mqtt.MQTTv311
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, **kwargs)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        if will is not None:
            topic, payload = will
            self.client.will_set(topic, payload, qos=1)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack.put((flags.session_present, reason_code, properties))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subacks.put(reason_codes)

    def _on_message(self, client, userdata, message):
        self.messages.put(message)

    def connect(self):
        if self.version == 5:
            props = Properties(PacketTypes.CONNECT)
            if self.expiry:
                props.SessionExpiryInterval = self.expiry
            self.client.connect(HOST, PORT, keepalive=30, clean_start=self.clean,
                                properties=props)
        else:
            self.client.connect(HOST, PORT, keepalive=30)
        self.client.loop_start()
        try:
            present, code, props = self.connack.get(timeout=WAIT)
        except queue.Empty:
            raise Failure("no CONNACK")
        check(not code.is_failure, f"CONNACK refused: {code}")
        self.session_present = bool(present)
        self.connack_properties = props
        return self

    def subscribe(self, topic, qos, sub_id=None):
        props = None
        if sub_id is not None:
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = sub_id
        if self.version == 5:
            result, _ = self.client.subscribe(topic, qos=qos, properties=props)
        else:
            result, _ = self.client.subscribe(topic, qos=qos)
        check(result == mqtt.MQTT_ERR_SUCCESS, f"subscribe {topic}: {result}")
        try:
            codes = self.subacks.get(timeout=WAIT)
        except queue.Empty:
            raise Failure(f"no SUBACK for {topic}")
        check(len(codes) == 1 and codes[0].value == qos,
              f"SUBACK for {topic}: {[str(c) for c in codes]}, expected granted QoS {qos}")

    def publish(self, topic, payload, qos, retain=False, properties=None):
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(WAIT)
        check(info.is_published(), f"publish {topic} q{qos} not completed")

    def next_message(self, what):
        try:
            return self.messages.get(timeout=WAIT)
        except queue.Empty:
            raise Failure(f"timed out waiting for {what}")

    def nothing_more(self, what):
        try:
            m = self.messages.get(timeout=QUIET)
        except queue.Empty:
            return
        raise Failure(f"{what}: unexpected message on {m.topic}: {m.payload!r}")

    def disconnect(self):
        self.client.disconnect()
        self.client.loop_stop()

    def crash(self):
        """Closes the socket without DISCONNECT (an abnormal end for the broker)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


def name(version, what):
    return f"paho-{RUN}-v{version}-{what}"


def pubsub_qos(version):
    base = f"paho/{RUN}/v{version}/qos"
    sub = Peer(version, name(version, "sub")).connect()
    sub.subscribe(base + "/#", 2)
    low = Peer(version, name(version, "low")).connect()
    low.subscribe(base + "/#", 1)
    pub = Peer(version, name(version, "pub")).connect()
    for qos in (0, 1, 2):
        pub.publish(f"{base}/{qos}", f"payload-{qos}".encode(), qos)
    for qos in (0, 1, 2):
        m = sub.next_message(f"QoS {qos} message")
        check((m.topic, m.payload, m.qos, m.retain) ==
              (f"{base}/{qos}", f"payload-{qos}".encode(), qos, False),
              f"QoS {qos}: got {m.topic} {m.payload!r} q{m.qos} r{m.retain}")
    for qos in (0, 1, 2):
        m = low.next_message(f"downgraded QoS {qos} message")
        check((m.payload, m.qos) == (f"payload-{qos}".encode(), min(qos, 1)),
              f"downgrade: got {m.payload!r} q{m.qos}")
    sub.nothing_more("after QoS messages")
    for p in (sub, low, pub):
        p.disconnect()


def retained(version):
    topic = f"paho/{RUN}/v{version}/retained"
    pub = Peer(version, name(version, "rpub")).connect()
    pub.publish(topic, b"state", 1, retain=True)
    sub = Peer(version, name(version, "rsub")).connect()
    sub.subscribe(topic, 1)
    m = sub.next_message("retained message")
    check((m.payload, m.retain, m.qos) == (b"state", True, 1),
          f"retained: got {m.payload!r} r{m.retain} q{m.qos}")
    pub.publish(topic, b"", 1, retain=True)
    m = sub.next_message("retained delete forwarded")
    check((m.payload, m.retain) == (b"", False), f"delete: got {m.payload!r} r{m.retain}")
    late = Peer(version, name(version, "rlate")).connect()
    late.subscribe(topic, 1)
    late.nothing_more("deleted retained message")
    for p in (pub, sub, late):
        p.disconnect()


def persistent_session(version):
    topic = f"paho/{RUN}/v{version}/persistent"
    cid = name(version, "dev")
    dev = Peer(version, cid, clean=True, expiry=60).connect()
    check(not dev.session_present, "first connection has no session")
    dev.disconnect()
    dev = Peer(version, cid, clean=False, expiry=60).connect()
    dev.subscribe(topic, 2)
    dev.disconnect()
    pub = Peer(version, name(version, "ppub")).connect()
    pub.publish(topic, b"while-offline-1", 1)
    pub.publish(topic, b"while-offline-2", 2)
    dev = Peer(version, cid, clean=False, expiry=60).connect()
    check(dev.session_present, "session present on reconnect")
    got = [dev.next_message("queued message").payload for _ in range(2)]
    check(got == [b"while-offline-1", b"while-offline-2"], f"queued messages: {got}")
    dev.disconnect()
    pub.disconnect()


def will_message(version):
    topic = f"paho/{RUN}/v{version}/will"
    watcher = Peer(version, name(version, "watch")).connect()
    watcher.subscribe(topic, 1)
    crasher = Peer(version, name(version, "crash"), will=(topic, b"gone")).connect()
    crasher.crash()
    m = watcher.next_message("will message")
    check((m.topic, m.payload) == (topic, b"gone"), f"will: got {m.topic} {m.payload!r}")
    polite = Peer(version, name(version, "polite"), will=(topic, b"nope")).connect()
    polite.disconnect()
    watcher.nothing_more("will after a normal DISCONNECT")
    watcher.disconnect()


def v5_features():
    base = f"paho/{RUN}/v5/props"
    anon = Peer(5, "").connect()
    assigned = getattr(anon.connack_properties, "AssignedClientIdentifier", None)
    check(assigned, "assigned client identifier for an empty client id")
    anon.disconnect()

    sub = Peer(5, name(5, "psub")).connect()
    sub.subscribe(base + "/#", 1, sub_id=42)
    pub = Peer(5, name(5, "ppub")).connect()
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k", "v1"), ("k", "v2")]
    props.ContentType = "application/json"
    props.ResponseTopic = base + "/reply"
    props.CorrelationData = b"\x00\x01corr"
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 120
    pub.publish(base + "/x", b'{"v":1}', 1, properties=props)
    m = sub.next_message("message with properties")
    p = m.properties
    check(m.payload == b'{"v":1}', f"payload {m.payload!r}")
    check(getattr(p, "UserProperty", None) == [("k", "v1"), ("k", "v2")],
          f"user properties {getattr(p, 'UserProperty', None)}")
    check(getattr(p, "ContentType", None) == "application/json", "content type")
    check(getattr(p, "ResponseTopic", None) == base + "/reply", "response topic")
    check(getattr(p, "CorrelationData", None) == b"\x00\x01corr", "correlation data")
    check(getattr(p, "PayloadFormatIndicator", None) == 1, "payload format indicator")
    expiry = getattr(p, "MessageExpiryInterval", None)
    check(expiry is not None and 110 <= expiry <= 120, f"message expiry {expiry}")
    check(getattr(p, "SubscriptionIdentifier", None) == [42],
          f"subscription identifier {getattr(p, 'SubscriptionIdentifier', None)}")

    # No Local.
    nl = Peer(5, name(5, "nolocal")).connect()
    result, _ = nl.client.subscribe(base + "/nl", options=mqtt.SubscribeOptions(qos=1, noLocal=True))
    check(result == mqtt.MQTT_ERR_SUCCESS, "subscribe no-local")
    nl.subacks.get(timeout=WAIT)
    nl.publish(base + "/nl", b"own", 1)
    m = sub.next_message("no-local message seen by another subscriber")
    check(m.payload == b"own", f"got {m.payload!r}")
    nl.nothing_more("No Local")
    for peer in (sub, pub, nl):
        peer.disconnect()


def main():
    global PORT
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    PORT = int(sys.argv[1])
    global HOST
    if len(sys.argv) > 2:
        HOST = sys.argv[2]
    checks = [
        ("v3.1.1 publish/subscribe QoS 0/1/2", lambda: pubsub_qos(4)),
        ("v3.1.1 retained", lambda: retained(4)),
        ("v3.1.1 persistent session", lambda: persistent_session(4)),
        ("v3.1.1 will", lambda: will_message(4)),
        ("v5 publish/subscribe QoS 0/1/2", lambda: pubsub_qos(5)),
        ("v5 retained", lambda: retained(5)),
        ("v5 persistent session", lambda: persistent_session(5)),
        ("v5 will", lambda: will_message(5)),
        ("v5 properties, subscription ids, no-local", v5_features),
    ]
    for label, run in checks:
        started = time.monotonic()
        try:
            run()
        except Failure as e:
            print(f"FAIL {label}: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001 - any error is a failed check
            print(f"FAIL {label}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"ok   {label} ({time.monotonic() - started:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
