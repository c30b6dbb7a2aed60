// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// flowtel's TCP health and packet-drop programs. BTF tracepoints (tp_btf),
// which need neither kprobes nor a mounted tracefs:
//
//   inet_sock_set_state  connection lifecycle: opened, closed, failed
//   tcp_receive_reset,   whether a connection ended by a reset
//   tcp_send_reset
//   tcp_probe            smoothed RTT and retransmitted segments, refreshed
//                        on every segment received in ESTABLISHED
//   tcp_retransmit_skb   the same, so a socket that only retransmits is
//                        tracked too
//   kfree_skb            packets the kernel dropped, with its drop reason
//
// Per-socket state lives in `socks` (keyed by the socket's address) until
// the socket closes; opened/closed/failed events go to userspace through
// the `tcp_events` ring buffer. Drops are summed in-kernel in `drops`
// (keyed by tuple and reason) because they come in floods: a ring buffer
// would lose exactly the events that matter. Whatever cannot be recorded
// (ring buffer or map full) is counted in `lost`.
//
// Licensed GPL-compatible (Dual BSD/GPL) because bpf_probe_read_kernel and
// tracing programs are only available to GPL-compatible programs.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#define FT_AF_INET 2
#define FT_AF_INET6 10
#define FT_ETH_P_IP 0x0800
#define FT_ETH_P_IPV6 0x86DD
#define FT_PROTO_TCP 6
#define FT_PROTO_UDP 17
#define FT_PROTO_SCTP 132

/* Event kinds, mirrored by `EventKind` in src/source/ebpf/health.rs. */
#define FT_EV_OPENED 1
#define FT_EV_CLOSED 2
#define FT_EV_FAILED 3

/* Which side of the connection the socket is. */
#define FT_ROLE_UNKNOWN 0 /* already open when flowtel started */
#define FT_ROLE_CLIENT 1 /* active open (connect) */
#define FT_ROLE_SERVER 2 /* passive open (accept) */

#define FT_RST_RECEIVED 1
#define FT_RST_SENT 2
/* The close itself was abortive: the kernel sends the RST only after
 * setting TCP_CLOSE (tcp_disconnect), so FT_RST_SENT would come too late. */
#define FT_RST_ABORT 4
/* The kernel gave up: retransmissions or keepalives unanswered. */
#define FT_TIMED_OUT 8

#define FT_ETIMEDOUT 110

/* Indexes of `lost`. */
#define FT_LOST_EVENTS 0 /* ring buffer full: events dropped */
#define FT_LOST_SOCKS 1 /* socks full: a socket could not be tracked */
#define FT_LOST_DROPS 2 /* drops full: dropped packets not recorded */
#define FT_LOST_N 3

/* 0: every network namespace; else only the one with this inode number.
 * Set by userspace before loading (EbpfConfig::netns). */
const volatile __u32 netns_ino = 0;

/* Mirrored by `SockState`. Addresses and ports are this socket's view:
 * local first. IPv4 in the first 4 bytes, the rest zero. */
struct ft_sock {
	__u8 laddr[16];
	__u8 raddr[16];
	__u16 lport; /* host byte order */
	__u16 rport;
	__u8 family; /* 4 or 6 */
	__u8 role; /* FT_ROLE_* */
	__u8 rst; /* FT_RST_* and FT_TIMED_OUT bits */
	__u8 established;
	__u64 open_ns; /* SYN sent or received; 0 when unknown */
	__u32 retransmits; /* tcp_sock.total_retrans: segments */
	__u32 srtt_us; /* smoothed RTT, microseconds */
	__u64 rtt_updates; /* incremented at each srtt refresh */
	/* Connection spans (src/flow/spans.rs). Initial sequence numbers,
	 * read at the transition to ESTABLISHED (snd_una - 1, rcv_nxt - 1:
	 * the SYNs are acknowledged and no data yet), or for a client that
	 * never opened at its close (snd_una: its SYN was never acknowledged).
	 * NAT rewrites addresses and ports but not these, so both ends of a
	 * connection read the same pair (swapped). */
	__u32 isn_local;
	__u32 isn_remote;
	/* tcp_sock counters read at the close: payload bytes sent (with
	 * retransmissions) and received, and segments (wire segments,
	 * including pure ACKs, SYNs and FINs) each way. */
	__u64 bytes_out;
	__u64 bytes_in;
	__u32 segs_out;
	__u32 segs_in;
	__u16 tcp_hdr_len; /* tcp_sock.tcp_header_len: TCP header with options */
	__u8 isn_known; /* 1: both ISNs, 2: only isn_local (SYN unanswered) */
	__u8 pad[5];
};

/* Mirrored by `RawEvent`. */
struct ft_tcp_event {
	struct ft_sock s;
	__u64 sk; /* the socket's address: pairs events of one socket */
	__u64 ts_ns; /* bpf_ktime_get_ns */
	__u8 kind; /* FT_EV_* */
	__u8 oldstate; /* the TCP state left, for FT_EV_CLOSED/FAILED */
	__u8 pad[6];
};

/* Only local variables have this type, and clang emits BTF for global
 * ones: this anchor (in .rodata, never read) keeps `struct ft_tcp_event` in
 * the object's BTF, so its Rust mirror is checked against it. */
const volatile struct ft_tcp_event *const ft_tcp_event_btf = 0;

/* Mirrored by `DropKey`. Addresses as the dropped packet carried them. */
struct ft_drop_key {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u32 reason; /* enum skb_drop_reason of the running kernel */
	__u8 proto;
	__u8 family; /* 4, 6, or 0 when the packet was not IP */
	__u8 pad[2];
};

struct ft_drop_val {
	__u64 packets; /* wire packets: gso_segs, 1 when not GSO */
	__u64 bytes; /* L3 length from the IP header */
};

/* max_entries of `socks` and `drops` are set by userspace before loading. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct ft_sock);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} tcp_events SEC(".maps");

/* Two drop maps and the `drop_epoch` that names the one written (0:
 * drops_a, 1: drops_b), as for the flow maps in flow.bpf.c: userspace
 * flips it, waits for an RCU grace period, then reads and empties the other
 * map, so no entry is deleted while a program may still add to it. */
struct drop_map {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ft_drop_key);
	__type(value, struct ft_drop_val);
};

struct drop_map drops_a SEC(".maps");
struct drop_map drops_b SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} drop_epoch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FT_LOST_N);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

static __always_inline void count_lost(__u32 what, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&lost, &what);

	if (v)
		*v += n;
}

static __always_inline int netns_ok(const struct sock *sk)
{
	if (!netns_ino)
		return 1;
	/* Direct loads: the arguments of BTF tracepoints are typed kernel
	 * pointers, and a load costs far less than bpf_probe_read_kernel,
	 * which matters in tcp_probe (every segment received). */
	return sk->__sk_common.skc_net.net->ns.inum == netns_ino;
}

/* The socket's addresses and ports. The local port is only known once
 * connect() has picked it (after SYN_SENT), so this is re-read later. */
static __always_inline void read_tuple(const struct sock *sk, struct ft_sock *s)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	s->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	s->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == FT_AF_INET) {
		__be32 l = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__be32 r = BPF_CORE_READ(sk, __sk_common.skc_daddr);

		s->family = 4;
		__builtin_memcpy(s->laddr, &l, 4);
		__builtin_memcpy(s->raddr, &r, 4);
	} else if (family == FT_AF_INET6) {
		s->family = 6;
		bpf_core_read(s->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(s->raddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
}

/* Smoothed RTT and retransmitted segments from the socket itself. */
static __always_inline void read_health(const struct sock *sk, struct ft_sock *s)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock((void *)sk);

	if (!tp)
		return;
	s->srtt_us = tp->srtt_us >> 3;
	s->retransmits = tp->total_retrans;
}

/* The initial sequence numbers of a socket that just reached ESTABLISHED
 * from SYN_SENT or SYN_RECV. */
static __always_inline void read_isn(const struct sock *sk, struct ft_sock *s)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock((void *)sk);

	if (!tp)
		return;
	s->isn_local = tp->snd_una - 1;
	s->isn_remote = tp->rcv_nxt - 1;
	s->isn_known = 1;
}

/* Bytes and segments each way, read at the close. */
static __always_inline void read_traffic(const struct sock *sk, struct ft_sock *s)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock((void *)sk);

	if (!tp)
		return;
	s->bytes_out = tp->bytes_sent;
	s->bytes_in = tp->bytes_received;
	s->segs_out = tp->segs_out;
	s->segs_in = tp->segs_in;
	s->tcp_hdr_len = tp->tcp_header_len;
	if (!s->isn_known) {
		/* A client whose SYN was never acknowledged. */
		s->isn_local = tp->snd_una;
		s->isn_known = 2;
	}
}

static __always_inline void emit(__u8 kind, __u8 oldstate, const struct sock *sk,
				 const struct ft_sock *s)
{
	struct ft_tcp_event *e = bpf_ringbuf_reserve(&tcp_events, sizeof(*e), 0);

	if (!e) {
		count_lost(FT_LOST_EVENTS, 1);
		return;
	}
	e->s = *s;
	e->sk = (__u64)sk;
	e->ts_ns = bpf_ktime_get_ns();
	e->kind = kind;
	e->oldstate = oldstate;
	bpf_ringbuf_submit(e, 0);
}

/* The state of a socket flowtel did not see open (it predates flowtel, or
 * `socks` was full then): tracked from now on, role unknown. */
static __always_inline struct ft_sock *track_late(const struct sock *sk, __u64 key)
{
	struct ft_sock init = {};

	if (BPF_CORE_READ(sk, __sk_common.skc_state) != TCP_ESTABLISHED)
		return 0;
	init.established = 1;
	read_tuple(sk, &init);
	if (bpf_map_update_elem(&socks, &key, &init, BPF_NOEXIST) != 0) {
		struct ft_sock *s = bpf_map_lookup_elem(&socks, &key);

		if (!s)
			count_lost(FT_LOST_SOCKS, 1);
		return s;
	}
	return bpf_map_lookup_elem(&socks, &key);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(flowtel_tcp_state, const struct sock *sk, const int oldstate, const int newstate)
{
	__u64 key = (__u64)sk;
	struct ft_sock *s;

	if (BPF_CORE_READ(sk, sk_protocol) != FT_PROTO_TCP || !netns_ok(sk))
		return 0;

	if (newstate == TCP_SYN_SENT) {
		struct ft_sock init = {};

		init.role = FT_ROLE_CLIENT;
		init.open_ns = bpf_ktime_get_ns();
		read_tuple(sk, &init);
		if (bpf_map_update_elem(&socks, &key, &init, BPF_ANY) != 0)
			count_lost(FT_LOST_SOCKS, 1);
		return 0;
	}

	if (newstate == TCP_ESTABLISHED &&
	    (oldstate == TCP_SYN_SENT || oldstate == TCP_SYN_RECV)) {
		/* A server socket (born in SYN_RECV) always starts afresh: an
		 * entry under its address is a stale one of a freed socket. */
		s = oldstate == TCP_SYN_SENT ? bpf_map_lookup_elem(&socks, &key) : 0;
		if (!s) {
			/* A server socket, or a client whose SYN_SENT entry did
			 * not fit. */
			struct ft_sock init = {};

			init.role = oldstate == TCP_SYN_SENT ? FT_ROLE_CLIENT : FT_ROLE_SERVER;
			init.open_ns = bpf_ktime_get_ns();
			if (bpf_map_update_elem(&socks, &key, &init, BPF_ANY) != 0)
				count_lost(FT_LOST_SOCKS, 1);
			s = bpf_map_lookup_elem(&socks, &key);
			if (!s) {
				/* Still report the opening, untracked. */
				read_tuple(sk, &init);
				emit(FT_EV_OPENED, oldstate, sk, &init);
				return 0;
			}
		}
		s->established = 1;
		read_tuple(sk, s);
		read_health(sk, s);
		read_isn(sk, s);
		emit(FT_EV_OPENED, oldstate, sk, s);
		return 0;
	}

	if (newstate == TCP_CLOSE && oldstate != TCP_LISTEN) {
		struct ft_sock fin = {};

		s = bpf_map_lookup_elem(&socks, &key);
		if (s)
			fin = *s;
		else if (oldstate == TCP_SYN_SENT)
			fin.role = FT_ROLE_CLIENT;
		/* By now an ephemeral local port has been released (inet_put_port
		 * runs before the state changes): keep the one read when open. */
		if (fin.lport == 0)
			read_tuple(sk, &fin);
		read_health(sk, &fin);
		if (oldstate == TCP_SYN_SENT || fin.isn_known)
			read_traffic(sk, &fin);
		if (BPF_CORE_READ(sk, sk_err) == FT_ETIMEDOUT)
			fin.rst |= FT_TIMED_OUT;
		/* An orderly close reaches CLOSE from LAST_ACK (passive side)
		 * or FIN_WAIT2/CLOSING (active side, via TIME_WAIT). */
		if (oldstate == TCP_ESTABLISHED || oldstate == TCP_CLOSE_WAIT ||
		    oldstate == TCP_FIN_WAIT1)
			fin.rst |= FT_RST_ABORT;
		if (fin.established)
			emit(FT_EV_CLOSED, oldstate, sk, &fin);
		else if (oldstate == TCP_SYN_SENT || oldstate == TCP_SYN_RECV)
			emit(FT_EV_FAILED, oldstate, sk, &fin);
		else if (oldstate != TCP_CLOSE) {
			/* Open before flowtel started and never seen since. */
			fin.established = 1;
			emit(FT_EV_CLOSED, oldstate, sk, &fin);
		}
		if (s)
			bpf_map_delete_elem(&socks, &key);
	}
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(flowtel_tcp_rst_in, struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct ft_sock *s = bpf_map_lookup_elem(&socks, &key);

	if (s)
		s->rst |= FT_RST_RECEIVED;
	return 0;
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(flowtel_tcp_rst_out, const struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct ft_sock *s;

	if (!sk)
		return 0;
	s = bpf_map_lookup_elem(&socks, &key);
	if (s)
		s->rst |= FT_RST_SENT;
	return 0;
}

/* Fires inside tcp_rcv_established for every segment received. */
SEC("tp_btf/tcp_probe")
int BPF_PROG(flowtel_tcp_probe, struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct ft_sock *s;

	if (!netns_ok(sk))
		return 0;
	s = bpf_map_lookup_elem(&socks, &key);
	if (!s)
		s = track_late(sk, key);
	if (!s)
		return 0;
	read_health(sk, s);
	__sync_fetch_and_add(&s->rtt_updates, 1);
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(flowtel_tcp_retransmit, const struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct ft_sock *s;

	if (!netns_ok(sk))
		return 0;
	s = bpf_map_lookup_elem(&socks, &key);
	if (!s)
		s = track_late(sk, key);
	if (!s)
		return 0;
	/* The kernel adds this retransmission to total_retrans just after
	 * the tracepoint; the next ACK (tcp_probe) or the close reads it. */
	read_health(sk, s);
	return 0;
}

/* The network namespace a dropped packet belongs to: its device's, else
 * its socket's (locally generated packets before routing). */
static __always_inline __u32 skb_netns(const struct sk_buff *skb)
{
	struct net_device *dev = BPF_CORE_READ(skb, dev);
	struct sock *sk;

	if (dev)
		return BPF_CORE_READ(dev, nd_net.net, ns.inum);
	sk = BPF_CORE_READ(skb, sk);
	if (sk)
		return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	return 0;
}

static __always_inline void read_ports(const unsigned char *l4, struct ft_drop_key *k)
{
	__u16 ports[2] = {};

	if (k->proto != FT_PROTO_TCP && k->proto != FT_PROTO_UDP && k->proto != FT_PROTO_SCTP)
		return;
	if (bpf_probe_read_kernel(ports, sizeof(ports), l4) < 0)
		return;
	k->sport = bpf_ntohs(ports[0]);
	k->dport = bpf_ntohs(ports[1]);
}

static __always_inline void add_drop(void *drops, struct ft_drop_key *k, __u64 segs,
				     __u64 bytes)
{
	struct ft_drop_val *v, init = {};

	v = bpf_map_lookup_elem(drops, k);
	if (!v) {
		init.packets = segs;
		init.bytes = bytes;
		if (bpf_map_update_elem(drops, k, &init, BPF_NOEXIST) == 0)
			return;
		v = bpf_map_lookup_elem(drops, k);
		if (!v) {
			count_lost(FT_LOST_DROPS, segs);
			return;
		}
	}
	v->packets += segs;
	v->bytes += bytes;
}

SEC("tp_btf/kfree_skb")
int BPF_PROG(flowtel_drop, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	struct ft_drop_key k = {};
	unsigned char *head;
	__u16 nh, proto;
	__u64 bytes = 0, segs;

	if (netns_ino && skb_netns(skb) != netns_ino)
		return 0;
	k.reason = (__u32)reason;
	head = BPF_CORE_READ(skb, head);
	nh = BPF_CORE_READ(skb, network_header);
	proto = bpf_ntohs(BPF_CORE_READ(skb, protocol));
	if (proto == FT_ETH_P_IP) {
		struct iphdr ip;

		if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh) == 0 && ip.version == 4) {
			k.family = 4;
			k.proto = ip.protocol;
			__builtin_memcpy(k.src, &ip.saddr, 4);
			__builtin_memcpy(k.dst, &ip.daddr, 4);
			bytes = bpf_ntohs(ip.tot_len);
			if ((bpf_ntohs(ip.frag_off) & 0x1fff) == 0)
				read_ports(head + nh + ip.ihl * 4, &k);
		}
	} else if (proto == FT_ETH_P_IPV6) {
		struct ipv6hdr ip6;

		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh) == 0 && ip6.version == 6) {
			k.family = 6;
			k.proto = ip6.nexthdr;
			bpf_probe_read_kernel(k.src, 16, &ip6.saddr);
			bpf_probe_read_kernel(k.dst, 16, &ip6.daddr);
			bytes = bpf_ntohs(ip6.payload_len) + sizeof(ip6);
			read_ports(head + nh + sizeof(ip6), &k);
		}
	}
	{
		struct skb_shared_info *shi =
			(struct skb_shared_info *)(head + BPF_CORE_READ(skb, end));

		segs = BPF_CORE_READ(shi, gso_segs);
	}
	if (segs == 0)
		segs = 1;

	{
		__u32 zero = 0;
		__u32 *e = bpf_map_lookup_elem(&drop_epoch, &zero);

		if (e && *e)
			add_drop(&drops_b, &k, segs, bytes);
		else
			add_drop(&drops_a, &k, segs, bytes);
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
