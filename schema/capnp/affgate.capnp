# affgate wire model: one Event per click or postback, and the Batch / Ack
# messages that carry them between an edge and a collector.
#
# Compatibility: fields are only ever appended (new ordinals); never renumber,
# retype or remove a field. Times are unix milliseconds (UTC). Money is i64
# micro-units (1 unit = 1_000_000), as ClickHouse Decimal(18,6).

@0xf773c067647e75af;

enum Status {
  # Lifecycle state of a conversion as reported by the network's postback.
  approved @0;  # payable conversion
  pending @1;   # reported, not yet approved
  rejected @2;  # refused by the advertiser; never payable
  reversed @3;  # was approved, then charged back
}

struct Click {
  clickId @0 :Text;       # the minted click id (40 base64url characters)
  tsMs @1 :UInt64;        # when the edge received the request, unix ms
  edgeId @2 :UInt16;      # id of the edge that served the redirect
  linkId @3 :UInt64;      # tracking link id (at most 2^40 - 1)
  offerId @4 :UInt64;     # offer the link points to
  affiliateId @5 :UInt64; # affiliate that owns the link
  slug @6 :Text;          # the link slug as requested (URL path segment)
  ip @7 :Data;            # client IP, 16 bytes; IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d)
  userAgent @8 :Text;     # User-Agent header, possibly truncated by the edge; empty if absent
  referer @9 :Text;       # Referer header, possibly truncated by the edge; empty if absent
  sub1 @10 :Text;         # affiliate sub-id 1 from the query string; empty if absent
  sub2 @11 :Text;         # affiliate sub-id 2; empty if absent
  sub3 @12 :Text;         # affiliate sub-id 3; empty if absent
  sub4 @13 :Text;         # affiliate sub-id 4; empty if absent
  sub5 @14 :Text;         # affiliate sub-id 5; empty if absent
  quarantined @15 :Bool;  # flagged by the edge (e.g. suspect traffic); not attributable until reviewed
  fallback @16 :Bool;     # served from the fallback path (link unknown or cache miss), not the link's target
}

struct Postback {
  tsMs @0 :UInt64;          # when the edge received the postback, unix ms
  edgeId @1 :UInt16;        # id of the edge that received it
  networkId @2 :UInt64;     # network (advertiser integration) that sent it, from its token
  clickId @3 :Text;         # click id the network echoed back (verified by the edge)
  txid @4 :Text;            # the network's transaction id; empty if none
  event @5 :Text;           # conversion event name (e.g. "sale", "lead"); empty means default
  status @6 :Status;        # conversion status reported by this postback
  hasPayout @7 :Bool;       # whether payoutMicros is set (false: network sent no payout)
  payoutMicros @8 :Int64;   # payout in micro-units of currency; meaningful only if hasPayout
  currency @9 :Text;        # ISO 4217 code as sent (e.g. "USD"); empty if none
  requestId @10 :Text;      # edge-assigned id of the HTTP request, for tracing
}

struct Event {
  # One click or postback, the unit the edge records in its ring.
  union {
    click @0 :Click;
    postback @1 :Postback;
  }
}

struct Entry {
  seq @0 :UInt64;   # edge-local sequence number of this entry in the edge's ring (monotonic per edge)
  event @1 :Event;  # the recorded event
}

struct Batch {
  # Events sent from an edge to a collector in one datagram or stream frame.
  edgeId @0 :UInt16;         # sending edge
  entries @1 :List(Entry);   # entries in ascending seq order
}

struct SeqRange {
  first @0 :UInt64;  # first acknowledged seq, inclusive
  last @1 :UInt64;   # last acknowledged seq, inclusive (first <= last)
}

struct Ack {
  # Collector -> edge: these entries are durably stored and may be freed.
  edgeId @0 :UInt16;           # edge whose entries are acknowledged
  ranges @1 :List(SeqRange);   # acknowledged seq ranges, ascending, non-overlapping
}
