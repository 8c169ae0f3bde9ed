#!/usr/bin/env python3
"""Eclipse Paho (paho-mqtt 2.x) against ferrymq's WebSocket and secure WebSocket listeners.

Usage: paho_listeners.py <ws_port> <wss_port> <ca_file> <client_cert> <client_key>

Over `ws` (path /mqtt) an MQTT 5 client subscribes; over `wss` (TLS, with a client certificate)
an MQTT 3.1.1 client publishes QoS 1; the subscriber must get the message. Exits 0 on success,
1 on a failed check, 2 on bad usage, 3 when paho-mqtt 2.x is missing.
"""

import queue
import ssl
import sys
import uuid

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError as e:  # pragma: no cover - environment problem
    print(f"paho-mqtt 2.x is required ({e})", file=sys.stderr)
    sys.exit(3)

TIMEOUT = 10


def fail(what):
    print(f"FAILED: {what}", file=sys.stderr)
    sys.exit(1)


def client(client_id, protocol, port, tls=None):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                    transport="websockets")
    c.ws_set_options(path="/mqtt")
    if tls:
        ca, cert, key = tls
        c.tls_set(ca_certs=ca, certfile=cert, keyfile=key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    connected = queue.Queue()
    c.on_connect = lambda cl, ud, flags, rc, props: connected.put(rc)
    c.connect("localhost", port, keepalive=30)
    c.loop_start()
    try:
        rc = connected.get(timeout=TIMEOUT)
    except queue.Empty:
        fail(f"{client_id}: no CONNACK")
    if rc.is_failure:
        fail(f"{client_id}: CONNACK {rc}")
    return c


def main():
    if len(sys.argv) != 6:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    ws_port, wss_port = int(sys.argv[1]), int(sys.argv[2])
    tls = sys.argv[3:6]
    topic = f"paho/ws/{uuid.uuid4().hex}"

    got = queue.Queue()
    subscribed = queue.Queue()
    sub = client("paho-ws-sub", mqtt.MQTTv5, ws_port)
    sub.on_message = lambda cl, ud, msg: got.put((msg.topic, msg.payload))
    sub.on_subscribe = lambda cl, ud, mid, codes, props: subscribed.put(codes)
    sub.subscribe(topic, qos=1)
    try:
        codes = subscribed.get(timeout=TIMEOUT)
    except queue.Empty:
        fail("no SUBACK over ws")
    if any(c.is_failure for c in codes):
        fail(f"SUBACK {codes}")

    pub = client("paho-wss-pub", mqtt.MQTTv311, wss_port, tls)
    info = pub.publish(topic, b"through wss and ws", qos=1)
    info.wait_for_publish(timeout=TIMEOUT)
    if not info.is_published():
        fail("no PUBACK over wss")
    try:
        t, payload = got.get(timeout=TIMEOUT)
    except queue.Empty:
        fail("the ws subscriber got nothing")
    if (t, payload) != (topic, b"through wss and ws"):
        fail(f"got {(t, payload)}")
    pub.disconnect()
    sub.disconnect()
    pub.loop_stop()
    sub.loop_stop()
    print("OK")


main()
