// SPDX-License-Identifier: Apache-2.0
//
// DNS request/response matching, included by flow.bpf.c. Only packets to or
// from port 53 (UDP, or TCP segments that start a DNS message) get here;
// everything else pays one port comparison.
//
// A query (QR=0) inserts a `dns_req` keyed by the client's address, port,
// the transport and the DNS id, with BPF_NOEXIST: the first hook that sees
// it wins, so later sightings (the other end of a veth, the node's uplink,
// the far side of a DNAT) neither restart the clock nor count twice. The
// server kept is the one the client addressed (a Service VIP before its
// DNAT). The response (QR=1) deletes the entry; whoever deletes it (this
// program, or userspace expiring it as a timeout) owns it, so a request is
// reported exactly once. The program parses only the 12-byte header and
// copies the question's first FT_DNS_QBYTES bytes; userspace decodes the
// name and type from them (no loops over packet data here, so a malformed
// name cannot cost the program anything).

#define FT_DNS_PORT 53
#define FT_DNS_HLEN 12
/* Question bytes copied: names up to about 120 characters and their type;
 * longer names are reported truncated (and counted). */
#define FT_DNS_QBYTES 128

/* dns_stats slots, mirrored by DNS_STAT_* in src/source/ebpf/dns.rs. */
#define FT_DNS_MAP_FULL 0 /* a query found dns_reqs full */
#define FT_DNS_PARSE_ERROR 1 /* short header, bogus counts or TCP length */
#define FT_DNS_RING_FULL 2 /* a completed request found the ring full */
#define FT_DNS_UNMATCHED 3 /* a response whose query was not (or no longer) held */
#define FT_DNS_STATS 4

/* Mirrored by `DnsKey`: one outstanding query. */
struct dns_key {
	__u8 client[16];
	__u16 cport;
	__u16 id;
	__u8 proto; /* FT_PROTO_UDP or FT_PROTO_TCP */
	__u8 family; /* 4 or 6 */
	__u16 pad;
};

/* Mirrored by `DnsRequest`. */
struct dns_req {
	__u64 start_ns; /* bpf_ktime_get_ns at the first sighting */
	__u8 server[16];
	__u16 sport;
	__u16 flags; /* the query's header flags (opcode, RD) */
	__u16 qlen; /* bytes of `q` copied */
	__u16 pad;
	__u8 q[FT_DNS_QBYTES]; /* the question: name (wire format), type, class */
};

/* Mirrored by `DnsEvent`: a query and its response, sent to userspace. */
struct dns_event {
	struct dns_key key;
	struct dns_req req;
	__u64 latency_ns;
	__u16 rflags; /* the response's header flags: QR, TC, RCODE */
	__u16 ancount;
	__u32 pad;
};

/* Only pointed to, so BTF would leave it out; this anchor (in .rodata,
 * never read) keeps it for the layout check of its Rust mirror. */
const volatile struct dns_event *const dns_event_btf = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096); /* EbpfConfig::dns.max_requests */
	__type(key, struct dns_key);
	__type(value, struct dns_req);
} dns_reqs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} dns_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FT_DNS_STATS);
	__type(key, __u32);
	__type(value, __u64);
} dns_stats SEC(".maps");

/* One query being built: too big for the stack next to the flow key. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dns_req);
} dns_scratch SEC(".maps");

/* Set to 1 by userspace when DNS tracking is enabled (EbpfConfig::dns). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} dns_on SEC(".maps");

static __always_inline void dns_count(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&dns_stats, &slot);

	if (v)
		*v += 1;
}

/* `off` is the transport header's offset; `fk` the packet's flow key. */
static __noinline int dns_packet(struct __sk_buff *skb, __u32 off, struct flow_key *fk)
{
	__u16 sport = fk->sport, dport = fk->dport;
	__u8 proto = fk->proto;
	struct dns_key key = {};
	__u8 h[FT_DNS_HLEN];
	__u32 zero = 0, msg, end = skb->len;
	__u16 flags, qdcount;
	__u32 *on = bpf_map_lookup_elem(&dns_on, &zero);

	if (!on || !*on)
		return 0;
	if (proto == FT_PROTO_TCP) {
		__u8 t[2];
		__u16 mlen;

		if (load(skb, off + 12, t, 1) < 0)
			return 0;
		msg = off + (t[0] >> 4) * 4;
		/* Segments without payload (handshake, ACKs) are not DNS. */
		if (msg >= end)
			return 0;
		/* A message that starts in this segment (RFC 7766 length
		 * prefix); continuation segments of a long answer start
		 * elsewhere and fail the checks below, which is why only
		 * the first segment of each message is parsed. */
		if (load(skb, msg, t, 2) < 0)
			return 0;
		mlen = (__u16)t[0] << 8 | t[1];
		msg += 2;
		if (mlen < FT_DNS_HLEN) {
			dns_count(FT_DNS_PARSE_ERROR);
			return 0;
		}
	} else {
		msg = off + 8;
	}
	if (msg + FT_DNS_HLEN > end || load(skb, msg, h, FT_DNS_HLEN) < 0) {
		dns_count(FT_DNS_PARSE_ERROR);
		return 0;
	}
	key.id = (__u16)h[0] << 8 | h[1];
	flags = (__u16)h[2] << 8 | h[3];
	qdcount = (__u16)h[4] << 8 | h[5];
	if (qdcount != 1) {
		dns_count(FT_DNS_PARSE_ERROR);
		return 0;
	}
	key.proto = proto;
	key.family = fk->family;

	if (!(flags & 0x8000)) {
		/* A query from the client at src to the server at dst. */
		struct dns_req *r = bpf_map_lookup_elem(&dns_scratch, &zero);
		__u32 qoff = msg + FT_DNS_HLEN, n;
		long err;

		if (!r || dport != FT_DNS_PORT)
			return 0;
		__builtin_memcpy(key.client, fk->src, 16);
		key.cport = sport;
		n = end - qoff;
		if (qoff >= end) {
			dns_count(FT_DNS_PARSE_ERROR);
			return 0;
		}
		if (n > FT_DNS_QBYTES)
			n = FT_DNS_QBYTES;
		/* Zeroed so that a shorter question leaves nothing of the
		 * previous one behind. */
		__builtin_memset(r->q, 0, FT_DNS_QBYTES);
		/* n is 1..FT_DNS_QBYTES; the mask spells that out for the
		 * verifier (FT_DNS_QBYTES is a power of two). */
		n = ((n - 1) & (FT_DNS_QBYTES - 1)) + 1;
		if (bpf_skb_load_bytes(skb, qoff, r->q, n) < 0) {
			dns_count(FT_DNS_PARSE_ERROR);
			return 0;
		}
		r->qlen = n;
		r->start_ns = bpf_ktime_get_ns();
		__builtin_memcpy(r->server, fk->dst, 16);
		r->sport = dport;
		r->flags = flags;
		r->pad = 0;
		err = bpf_map_update_elem(&dns_reqs, &key, r, BPF_NOEXIST);
		if (err != 0 && err != -FT_EEXIST)
			dns_count(FT_DNS_MAP_FULL);
		return 0;
	}

	/* A response from the server at src to the client at dst. */
	{
		struct dns_req *r;
		struct dns_event *ev;
		__u64 now = bpf_ktime_get_ns();

		if (sport != FT_DNS_PORT)
			return 0;
		__builtin_memcpy(key.client, fk->dst, 16);
		key.cport = dport;
		r = bpf_map_lookup_elem(&dns_reqs, &key);
		if (!r) {
			dns_count(FT_DNS_UNMATCHED);
			return 0;
		}
		ev = bpf_ringbuf_reserve(&dns_events, sizeof(*ev), 0);
		if (!ev) {
			/* Kept: userspace reports it as a timeout, and counts
			 * the ring's overflow. */
			dns_count(FT_DNS_RING_FULL);
			return 0;
		}
		__builtin_memcpy(&ev->key, &key, sizeof(key));
		__builtin_memcpy(&ev->req, r, sizeof(*r));
		/* The delete decides: userspace may have expired it meanwhile. */
		if (bpf_map_delete_elem(&dns_reqs, &key) != 0) {
			bpf_ringbuf_discard(ev, 0);
			return 0;
		}
		ev->latency_ns = now > ev->req.start_ns ? now - ev->req.start_ns : 0;
		ev->rflags = flags;
		ev->ancount = (__u16)h[6] << 8 | h[7];
		ev->pad = 0;
		bpf_ringbuf_submit(ev, 0);
	}
	return 0;
}

static __always_inline void dns_check(struct __sk_buff *skb, __u32 off, struct flow_key *key)
{
	if ((key->proto == FT_PROTO_UDP || key->proto == FT_PROTO_TCP) &&
	    (key->sport == FT_DNS_PORT || key->dport == FT_DNS_PORT))
		dns_packet(skb, off, key);
}
