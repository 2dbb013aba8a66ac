#!/usr/bin/env python3
"""An Ensemble agent and event subscriber in Python, written from docs/protocol.md alone.

It uses nothing from the C++ code base: only pyzmq and msgpack (Debian: python3-zmq,
python3-msgpack). tests/interop_test.cpp runs it against a real ensemble-broker, but it also
runs by hand:

    python3 tests/interop/interop_agent.py --router tcp://127.0.0.1:5555 \\
        --events tcp://127.0.0.1:5556 --subscribe order.

What it does (section numbers are docs/protocol.md's):

- a DEALER on the router: HELLO offering one service (default `PyEcho`), WELCOME, HEARTBEAT
  every `heartbeat_ms`, HELLO again on `ERROR not_registered`, a new DEALER when the broker
  is silent for `--liveness` intervals (4, HEARTBEAT; 9);
- DISPATCH -> REPLY with the token echoed (4, REQUEST -> DISPATCH -> REPLY). Actions:
    upper  {text}  -> {text: TEXT, handled_by: "python", agent, correlation_id, attempt}, and
                      publishes `interop.py.handled` carrying the request's trace context,
                      with `ack: true` (4, PUBLISH -> event (and PUBLISH_ACK));
    echo   any     -> the payload unchanged;
    fail   {text}  -> error reply `interop_refused`, retryable;
    big    {size}  -> `size` bytes, or error `too_large` when that exceeds the WELCOME's
                      `max_message_size` (header + payload);
    other          -> error `unknown_action`;
- a SUB on the events endpoint, subscribed to the `--subscribe` prefixes and then to a private
  probe topic, published until it arrives so that the subscriptions are known to be active
  (4, Subscription);
- with `--consume STREAM/CONSUMER`, a member of that durable consumer (11, Durable consumers):
  CONSUME after every WELCOME (a restarted broker forgot its members), with `--consume-config`
  (a JSON map) as the msgpack payload and `--consume-capacity` as `capacity`. Each DELIVER is
  answered by what its payload asks, `{do: ...}`:
    nack_once -> NACK (reason "python nacks <id>") on the first delivery, ACK on the next;
    term      -> TERM with error_code `interop_term`: a dead letter at once;
    anything else -> ACK.
- with `--key FILE --broker-key KEY|FILE`, a client of a secured broker (12, Connecting): both
  sockets are CURVE clients, with this agent's pair read from its secret certificate file
  (`zmq.auth.load_certificate`) and the broker's public key given as its 40 Z85 characters or
  a certificate file. `--name` must then be the key's identity (or "" to send no `agent`).

Every fact is one line on stdout, flushed at once, starting with `interop-agent `:
  welcome broker=<id> heartbeat_ms=<n> max_message_size=<n> registrations=<k>
  subscribed prefixes=<p,...>
  ready name=<agent> service=<service>
  handled id=<id> action=<action> correlation=<id> attempt=<n>
  ack id=<id> topic=<topic> seq=<n>
  event topic=<topic> seq=<n> id=<id> publisher=<agent> correlation=<id> causation=<id> body=<json>
  consuming stream=<s> consumer=<c> members=<n> ack_floor=<n>
  delivery stream=<s> consumer=<c> stream_seq=<n> deliveries=<n> id=<id> topic=<t> answer=<ACK|NACK|TERM> correlation=<id> body=<json>
  heartbeat n=<broker heartbeats received>
  refused code=<error_code> id=<id> message=<error_message>
  bye
SIGTERM or SIGINT: BYE, then exit 0. Exit 1 when the broker does not answer at start-up.
"""

import argparse
import json
import os
import signal
import sys
import time

import msgpack
import zmq

# Section 2: frame 0 of every router message, and the command bytes.
TAG = b"ENS\x01"
HELLO, WELCOME, BYE = 0x01, 0x02, 0x03
REQUEST, DISPATCH, REPLY = 0x10, 0x11, 0x12
PUBLISH, PUBLISH_ACK = 0x20, 0x21
HEARTBEAT, ERROR = 0x30, 0x7F
# Section 11, Durable consumers.
CONSUME, DELIVER, ACK, NACK, TERM, PROGRESS, CONSUME_STOP = 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46


def say(*words):
    print("interop-agent", *words, flush=True)


def pack(value):
    # str -> msgpack str, bytes -> bin; non-negative ints are msgpack uints (section 3 accepts
    # any integer encoding of a value >= 0).
    return msgpack.packb(value, use_bin_type=True)


def unpack(data):
    return msgpack.unpackb(data, raw=False)


def field(body, key, default):
    """body[key] when the payload decoded to a map that has it."""
    return body.get(key, default) if isinstance(body, dict) else default


def show(value):
    """A payload for one output line: decoded msgpack as compact JSON, else hex."""
    try:
        return json.dumps(unpack(value), sort_keys=True, separators=(",", ":"))
    except Exception:  # not msgpack (or not JSON-representable): show the bytes
        return "hex:" + value.hex()


def curve_options(args):
    """Section 12, Connecting: the socket options of a CURVE client, or none in plain mode."""
    if not args.key and not args.broker_key:
        return []
    if not args.key or not args.broker_key:
        sys.exit("interop_agent: --key and --broker-key go together")
    import zmq.auth
    public, secret = zmq.auth.load_certificate(args.key)
    if secret is None:
        sys.exit("interop_agent: --key %s holds no secret-key" % args.key)
    if len(args.broker_key) == 40 and not os.path.exists(args.broker_key):
        server = args.broker_key.encode()
    else:
        server, _ = zmq.auth.load_certificate(args.broker_key)
    return [(zmq.CURVE_SERVERKEY, server), (zmq.CURVE_PUBLICKEY, public),
            (zmq.CURVE_SECRETKEY, secret)]


class Agent:
    def __init__(self, args):
        self.args = args
        self.ctx = zmq.Context()
        self.dealer = None
        self.heartbeat_s = 1.0  # until WELCOME says otherwise (section 4, HEARTBEAT)
        self.max_message_size = 1024 * 1024
        self.registrations = 0
        self.broker_id = None
        self.last_heard = time.monotonic()
        self.next_heartbeat = time.monotonic()
        self.heartbeats = 0
        self.stopping = False
        self.id_prefix = os.urandom(8).hex()  # section 3: "<16 hex random>-<hex counter>"
        self.counter = 0
        self.curve = curve_options(args)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.secure(self.sub)
        self.sub.connect(args.events)
        self.consume_calls = set()  # ids of our CONSUMEs waiting for their REPLY

    def secure(self, socket):
        for option, value in self.curve:
            socket.setsockopt(option, value)

    def next_id(self):
        self.counter += 1
        return "%s-%x" % (self.id_prefix, self.counter)

    # --- the DEALER ---------------------------------------------------------------------------

    def connect(self):
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 1000)  # lets BYE leave before the process exits
        self.secure(self.dealer)
        self.dealer.connect(self.args.router)
        self.last_heard = time.monotonic()
        self.send_hello()

    def send(self, command, header, payload=b""):
        frames = [TAG, bytes([command]), pack(header)]
        if payload:
            frames.append(payload)
        self.dealer.send_multipart(frames)

    def send_hello(self):
        hello = {"services": [{"name": self.args.service, "capacity": self.args.capacity}]}
        if self.args.name:  # secured mode: absent means "the key's identity" (section 12)
            hello["agent"] = self.args.name
        self.send(HELLO, hello)

    def receive(self):
        """One router message as (command, header, payload), or None if it is not well formed."""
        frames = self.dealer.recv_multipart()
        self.last_heard = time.monotonic()  # any message is a sign of life
        if len(frames) not in (3, 4) or frames[0] != TAG or len(frames[1]) != 1:
            say("refused code=local_bad_frames id= message=%d frames from the broker" % len(frames))
            return None
        header = unpack(frames[2])
        if not isinstance(header, dict):
            return None
        return frames[1][0], header, frames[3] if len(frames) == 4 else b""

    def on_router_message(self, command, header, payload):
        if command == WELCOME:
            self.registrations += 1
            self.broker_id = header.get("broker", "")
            self.heartbeat_s = header.get("heartbeat_ms", 1000) / 1000.0
            self.max_message_size = header.get("max_message_size", self.max_message_size)
            self.next_heartbeat = time.monotonic() + self.heartbeat_s
            say("welcome broker=%s heartbeat_ms=%d max_message_size=%d registrations=%d"
                % (self.broker_id, header.get("heartbeat_ms", 1000), self.max_message_size,
                   self.registrations))
            # Section 11: members must CONSUME after HELLO, and again after every registration
            # (a restarted broker, or one that declared us lost, forgot its members).
            if self.args.consume:
                self.send_consume()
        elif command == HEARTBEAT:
            self.heartbeats += 1
            say("heartbeat n=%d" % self.heartbeats)
        elif command == DISPATCH:
            self.on_dispatch(header, payload)
        elif command == PUBLISH_ACK:
            say("ack id=%s topic=%s seq=%d" % (header.get("id", ""), header.get("topic", ""),
                                               header.get("seq", 0)))
        elif command == DELIVER:
            self.on_deliver(header, payload)
        elif command == REPLY and header.get("id") in self.consume_calls:
            self.consume_calls.discard(header["id"])
            if header.get("error_code"):
                say("refused code=%s id=%s message=%s" % (header["error_code"], header["id"],
                                                          header.get("error_message", "")))
                if header["error_code"] == "not_registered":
                    self.send_hello()  # the WELCOME sends CONSUME again
            else:
                info = unpack(payload) if payload else {}
                say("consuming stream=%s consumer=%s members=%d ack_floor=%d"
                    % (field(info, "stream", ""), field(info, "consumer", ""),
                       len(field(info, "members", [])), field(info, "ack_floor", 0)))
        elif command == ERROR:
            code = header.get("error_code", "")
            say("refused code=%s id=%s message=%s" % (code, header.get("id", ""),
                                                      header.get("error_message", "")))
            if code == "not_registered":
                self.send_hello()  # the broker lost us (or restarted): register again at once
        # Other REPLYs would answer calls of ours; this agent makes none.

    def on_dispatch(self, request, payload):
        action = request.get("action", "")
        # The reply names the request by its id and echoes the broker's token: a REPLY without
        # it is refused with ERROR bad_request carrying this id (section 4, "Refusals"), which
        # shows up as a `refused` line.
        reply = {"id": request.get("id", ""), "token": request.get("token", 0),
                 "worker": self.args.name}
        for key in ("correlation_id", "trace_id"):
            if key in request:
                reply[key] = request[key]
        result = b""
        body = None
        if action in ("upper", "fail", "big") and payload:
            try:
                body = unpack(payload)
            except Exception as e:
                action = None
                reply.update(error_code="bad_request", retryable=False,
                             error_message="payload is not msgpack: %s" % e)
        if action == "upper":
            text = str(field(body, "text", "")).upper()
            result = pack({"text": text, "handled_by": "python", "agent": self.args.name,
                           "correlation_id": request.get("correlation_id", ""),
                           "attempt": request.get("attempt", 1)})
            self.publish_handled(request, text)
        elif action == "echo":
            result = payload  # opaque bytes, whatever they are
        elif action == "fail":
            reply.update(error_code="interop_refused", retryable=True,
                         error_message="the python agent refuses '%s'" % field(body, "text", ""))
        elif action == "big":
            result = b"b" * int(field(body, "size", 0))
        elif action is not None:
            reply.update(error_code="unknown_action", retryable=False,
                         error_message="service '%s' has no action '%s' (upper, echo, fail, big)"
                         % (self.args.service, action))
        # Section 10: header + payload must fit max_message_size; send a small error instead.
        size = len(pack(reply)) + len(result)
        if size > self.max_message_size:
            result = b""
            reply.update(error_code="too_large", retryable=False,
                         error_message="reply of %s.%s is %d bytes; the limit is %d"
                         % (self.args.service, action, size, self.max_message_size))
        say("handled id=%s action=%s correlation=%s attempt=%d"
            % (request.get("id", ""), action, request.get("correlation_id", ""),
               request.get("attempt", 1)))
        self.send(REPLY, reply, result)

    # --- durable consumer (section 11) ---------------------------------------------------------

    def send_consume(self):
        stream, consumer = self.args.consume.split("/", 1)
        call_id = self.next_id()
        self.consume_calls.add(call_id)
        header = {"id": call_id, "stream": stream, "consumer": consumer,
                  "capacity": self.args.consume_capacity}
        config = json.loads(self.args.consume_config) if self.args.consume_config else None
        self.send(CONSUME, header, pack(config) if config else b"")

    def on_deliver(self, header, payload):
        # DELIVER: the stored event's header plus stream, stream_seq, consumer, deliveries. An
        # answer names the delivery by stream, consumer and stream_seq; without an `id` it is
        # confirmed only when refused (an ERROR).
        try:
            body = unpack(payload) if payload else None
        except Exception:
            body = None
        do = field(body, "do", "ack")
        deliveries = header.get("deliveries", 1)
        answer = {"stream": header.get("stream", ""), "consumer": header.get("consumer", ""),
                  "stream_seq": header.get("stream_seq", 0)}
        if do == "nack_once" and deliveries == 1:
            command, name = NACK, "NACK"
            answer["error_message"] = "python nacks %s" % header.get("id", "")
        elif do == "term":
            command, name = TERM, "TERM"
            answer.update(error_code="interop_term",
                          error_message="python refuses %s for good" % header.get("id", ""))
        else:
            command, name = ACK, "ACK"
        say("delivery stream=%s consumer=%s stream_seq=%d deliveries=%d id=%s topic=%s answer=%s "
            "correlation=%s body=%s"
            % (answer["stream"], answer["consumer"], answer["stream_seq"], deliveries,
               header.get("id", ""), header.get("topic", ""), name,
               header.get("correlation_id", ""), show(payload)))
        self.send(command, answer)

    def publish_handled(self, request, text):
        """An event caused by the request: same correlation and trace, causation = its id."""
        event_id = self.next_id()
        header = {"id": event_id, "topic": "interop.py.handled", "ack": True,
                  "correlation_id": request.get("correlation_id") or request.get("id", ""),
                  "causation_id": request.get("id", "")}
        if "trace_id" in request:
            header["trace_id"] = request["trace_id"]
        self.send(PUBLISH, header, pack({"request_id": request.get("id", ""), "text": text}))

    # --- start-up ----------------------------------------------------------------------------

    def start(self):
        """HELLO until WELCOME, then makes the subscriptions active. False at the deadline."""
        deadline = time.monotonic() + self.args.start_timeout
        for prefix in self.args.subscribe:
            self.sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        # Section 4, Subscription: a private probe topic, subscribed after the others.
        probe = "_ensemble.sync.%s" % self.next_id()
        self.sub.setsockopt(zmq.SUBSCRIBE, probe.encode())
        self.connect()
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        subscribed = False
        next_probe = 0.0
        while not (subscribed and self.registrations > 0):
            now = time.monotonic()
            if now >= deadline or self.stopping:
                return False
            if now >= next_probe and not subscribed:
                self.send(PUBLISH, {"id": self.next_id(), "topic": probe})
                next_probe = now + 0.02
            wake = deadline if subscribed else min(deadline, next_probe)
            timeout = max(1, int(1000 * (wake - now)))
            for socket, _ in poller.poll(min(timeout, 100)):
                if socket is self.sub:
                    topic = self.sub.recv_multipart()[0].decode()
                    if topic == probe:
                        self.sub.setsockopt(zmq.UNSUBSCRIBE, probe.encode())
                        subscribed = True
                        say("subscribed prefixes=%s" % ",".join(self.args.subscribe))
                else:
                    message = self.receive()
                    if message is not None:
                        self.on_router_message(*message)
        return True

    # --- the loop ----------------------------------------------------------------------------

    def on_event(self, frames):
        # Section 4, Subscription: [topic][header][payload].
        if len(frames) != 3:
            return
        topic = frames[0].decode()
        if topic.startswith("_"):
            return  # control topics (probes) of other subscribers
        header = unpack(frames[1])
        say("event topic=%s seq=%d id=%s publisher=%s correlation=%s causation=%s body=%s"
            % (topic, header.get("seq", 0), header.get("id", ""), header.get("publisher", ""),
               header.get("correlation_id", ""), header.get("causation_id", ""),
               show(frames[2])))

    def run(self):
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        while not self.stopping:
            now = time.monotonic()
            if now >= self.next_heartbeat:
                self.send(HEARTBEAT, {})
                self.next_heartbeat = now + self.heartbeat_s
            if now - self.last_heard > self.args.liveness * self.heartbeat_s:
                # Section 4, HEARTBEAT: the broker is lost; a new DEALER, and HELLO again.
                say("refused code=local_broker_lost id= message=silent for %d intervals"
                    % self.args.liveness)
                poller.unregister(self.dealer)
                self.connect()
                poller.register(self.dealer, zmq.POLLIN)
            timeout = max(0, int(1000 * (self.next_heartbeat - time.monotonic())))
            for socket, _ in poller.poll(min(timeout, 100)):
                if socket is self.sub:
                    self.on_event(self.sub.recv_multipart())
                else:
                    message = self.receive()
                    if message is not None:
                        self.on_router_message(*message)

    def bye(self):
        # Section 4, BYE: the services go away at once. Linger lets it reach the broker.
        self.send(BYE, {})
        self.dealer.close()
        self.sub.close()
        self.ctx.term()
        say("bye")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", required=True, help="the broker's router endpoint")
    parser.add_argument("--events", required=True, help="the broker's events endpoint")
    parser.add_argument("--name", default="py-agent", help="agent name")
    parser.add_argument("--service", default="PyEcho", help="service offered")
    parser.add_argument("--capacity", type=int, default=1, help="requests in flight")
    parser.add_argument("--subscribe", action="append", default=None,
                        help="topic prefix to subscribe to (repeatable; default interop.cpp.)")
    parser.add_argument("--liveness", type=int, default=3,
                        help="silent heartbeat intervals before the broker counts as lost")
    parser.add_argument("--start-timeout", type=float, default=10.0,
                        help="seconds to wait for WELCOME and the subscriptions")
    parser.add_argument("--consume", default=None, metavar="STREAM/CONSUMER",
                        help="be a member of this durable consumer")
    parser.add_argument("--consume-capacity", type=int, default=1,
                        help="deliveries held at once (the CONSUME's capacity)")
    parser.add_argument("--consume-config", default=None, metavar="JSON",
                        help="the consumer's configuration, a JSON map (the CONSUME payload)")
    parser.add_argument("--key", default=None, metavar="FILE",
                        help="secured broker: this agent's secret certificate file")
    parser.add_argument("--broker-key", default=None, metavar="KEY|FILE",
                        help="secured broker: its public key (40 Z85 characters or a file)")
    args = parser.parse_args()
    if not args.subscribe:
        args.subscribe = ["interop.cpp."]

    agent = Agent(args)

    def stop(signum, frame):
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if not agent.start():
        say("refused code=local_start_failed id= message=no WELCOME or probe within %.1f s"
            % args.start_timeout)
        return 1
    say("ready name=%s service=%s" % (args.name, args.service))
    agent.run()
    agent.bye()
    return 0


if __name__ == "__main__":
    sys.exit(main())
