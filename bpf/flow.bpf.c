// SPDX-License-Identifier: Apache-2.0
//
// flowtel's TC flow counter. Attached at TC ingress and egress of the
// configured interfaces; it never changes a packet and always returns
// TC_ACT_UNSPEC, so whatever runs after it (Cilium, Calico, ...) decides.
//
// Every packet is added to one entry of `flows`, keyed by its directional
// 5-tuple plus the sighting point (ifindex and hook). Userspace merges the
// entries of one connection and takes, per direction, the MAXIMUM over the
// sighting points, so a packet seen on several interfaces (veth host side
// then the egress device, a VLAN and its parent, a bridge port and the
// bridge) is counted once. See bpf/README.md for the rule and its limits.
//
// Built by build.rs: clang -O2 -g -target bpf -D__TARGET_ARCH_x86 -I$OUT_DIR

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define TC_ACT_UNSPEC (-1)
#define FT_EEXIST 17
#define FT_ENOMEM 12

#define FT_ETH_HLEN 14
#define FT_ETH_P_IP 0x0800
#define FT_ETH_P_IPV6 0x86DD

#define FT_PROTO_ICMP 1
#define FT_PROTO_TCP 6
#define FT_PROTO_UDP 17
#define FT_PROTO_ICMPV6 58
#define FT_PROTO_SCTP 132
#define FT_PROTO_UDPLITE 136

/* IPv6 extension headers that are skipped to find the transport. */
#define FT_NH_HOPOPTS 0
#define FT_NH_ROUTING 43
#define FT_NH_FRAGMENT 44
#define FT_NH_AH 51
#define FT_NH_DSTOPTS 60
#define FT_MAX_EXT_HDRS 6

#define FT_DIR_INGRESS 0
#define FT_DIR_EGRESS 1

/* TCP flags are kept in the low byte of flow_val.flags; this bit records a
 * SYN without ACK, i.e. this direction's sender opened the connection. */
#define FT_TCP_SYN 0x02
#define FT_TCP_ACK 0x10
#define FT_FLAG_SYN_ONLY 0x100

/* The layout is mirrored by `FlowKey` in src/source/ebpf/maps.rs. */
struct flow_key {
	__u8 src[16]; /* IPv4 in the first 4 bytes, the rest zero */
	__u8 dst[16];
	__u16 sport; /* host byte order; ICMP echo id on the client side */
	__u16 dport;
	__u8 proto;
	__u8 family; /* 4 or 6 */
	__u8 dir; /* FT_DIR_* */
	__u8 pad;
	__u32 ifindex;
};

/* Mirrored by `FlowValue`. One copy per CPU; userspace sums them. */
struct flow_val {
	__u64 bytes; /* L3: skb->len minus the L2 header */
	__u64 packets; /* wire packets: gso_segs, 1 when not GSO */
	__u64 first_ns; /* bpf_ktime_get_coarse_ns (CLOCK_MONOTONIC, jiffies) */
	__u64 last_ns;
	__u32 flags; /* TCP flags OR'ed, plus FT_FLAG_SYN_ONLY */
	__u32 pad;
};

/* What could not be recorded: the map was full (E2BIG) or, without
 * preallocation, an entry could not be allocated (ENOMEM). */
struct overflow_val {
	__u64 packets;
	__u64 bytes;
	__u64 nomem_packets; /* the ENOMEM share of `packets` */
	__u64 pad;
};

/* build.rs compiles this file twice: preallocated (-DFT_PREALLOC), which
 * never fails an insert below max_entries but costs max_entries * 40 bytes
 * * possible CPUs up front, and dynamic, whose memory follows the live
 * entries but whose inserts can fail with ENOMEM in bursts of new flows.
 * Userspace picks one (EbpfConfig::preallocate). */
#ifdef FT_PREALLOC
#define FT_FLOWS_FLAGS 0
#else
#define FT_FLOWS_FLAGS BPF_F_NO_PREALLOC
#endif

/* Two flow maps, and `epoch` says which one the programs write: 0 for
 * flows_a, 1 for flows_b. At each dump userspace flips `epoch`, waits for an
 * RCU grace period (every program that read the old value has returned),
 * then reads and empties the other map, which nothing writes any more, and
 * adds it to its running totals. No entry is ever deleted while a program
 * may still hold a pointer to it (the eviction race of a single map).
 * max_entries is set by userspace before loading (EbpfConfig::max_flows). */
struct flow_map {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, FT_FLOWS_FLAGS);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
};

struct flow_map flows_a SEC(".maps");
struct flow_map flows_b SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} epoch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct overflow_val);
} overflow SEC(".maps");

struct ft_ipv4 {
	__u8 vhl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 proto;
	__be16 check;
	__u8 saddr[4];
	__u8 daddr[4];
};

struct ft_ipv6 {
	__be32 vtc_flow;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* Headers as deep as this are read in place; deeper ones (long IPv6
 * extension chains) through bpf_skb_load_bytes. */
#define FT_MAX_DIRECT_OFF 256

/* Copies `len` bytes at `off`: straight from the packet when they are in
 * its linear part (the usual case, and several times cheaper than a helper
 * call), else with bpf_skb_load_bytes, which also reads paged data. */
static __always_inline int load(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off < FT_MAX_DIRECT_OFF && data + off + len <= end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

static __always_inline void record_in(void *flows, struct __sk_buff *skb,
				      struct flow_key *key, __u32 l2_len, __u32 flags)
{
	__u32 len = skb->len;
	__u64 bytes = len > l2_len ? len - l2_len : 0;
	__u64 segs = skb->gso_segs;
	/* The coarse clock (jiffies resolution) is enough for first and last
	 * seen and costs a third of bpf_ktime_get_ns, which reads the TSC. */
	__u64 now = bpf_ktime_get_coarse_ns();
	struct flow_val *v;
	long err;

	if (segs == 0)
		segs = 1;

	v = bpf_map_lookup_elem(flows, key);
	if (!v) {
		struct flow_val init = {
			.bytes = bytes,
			.packets = segs,
			.first_ns = now,
			.last_ns = now,
			.flags = flags,
		};
		err = bpf_map_update_elem(flows, key, &init, BPF_NOEXIST);
		if (err == 0)
			return;
		/* Another CPU inserted the key first: add to our CPU's slot. */
		if (err == -FT_EEXIST)
			v = bpf_map_lookup_elem(flows, key);
		if (!v) {
			/* The map is full (E2BIG) or out of memory: say so. */
			__u32 zero = 0;
			struct overflow_val *o = bpf_map_lookup_elem(&overflow, &zero);

			if (o) {
				o->packets += segs;
				o->bytes += bytes;
				if (err == -FT_ENOMEM)
					o->nomem_packets += segs;
			}
			return;
		}
	}
	/* Per-CPU slot, and TC runs with migration disabled: no atomics needed. */
	v->bytes += bytes;
	v->packets += segs;
	v->last_ns = now;
	v->flags |= flags;
	if (v->first_ns == 0)
		v->first_ns = now;
}

/* Adds the packet to the map `epoch` names. Two inlined copies, each with
 * its own map: the verifier then inlines each hash lookup. */
static __always_inline void record(struct __sk_buff *skb, struct flow_key *key,
				   __u32 l2_len, __u32 flags)
{
	__u32 zero = 0;
	__u32 *e = bpf_map_lookup_elem(&epoch, &zero);

	if (e && *e)
		record_in(&flows_b, skb, key, l2_len, flags);
	else
		record_in(&flows_a, skb, key, l2_len, flags);
}

#include "dns.h"

/* Reads the transport ports (or ICMP echo id) and TCP flags at `off`. */
static __always_inline void parse_l4(struct __sk_buff *skb, __u32 off,
				     struct flow_key *key, __u32 *flags)
{
	/* TCP: ports, seq, ack, offset, flags. ICMP: type, code, csum, id. */
	__u8 b[14] = {};
	__u8 p = key->proto;

	if (p == FT_PROTO_TCP) {
		if (load(skb, off, b, 14) < 0)
			return;
		*flags = b[13];
		if ((b[13] & (FT_TCP_SYN | FT_TCP_ACK)) == FT_TCP_SYN)
			*flags |= FT_FLAG_SYN_ONLY;
	} else if (p == FT_PROTO_UDP || p == FT_PROTO_UDPLITE || p == FT_PROTO_SCTP) {
		if (load(skb, off, b, 4) < 0)
			return;
	} else if (p == FT_PROTO_ICMP || p == FT_PROTO_ICMPV6) {
		if (load(skb, off, b, 8) < 0)
			return;
		/* The echo id is the client's "port" and the server's is 0, so
		 * request and reply pair up; other ICMP types keep 0 and 0. */
		if ((p == FT_PROTO_ICMP && b[0] == 8) || (p == FT_PROTO_ICMPV6 && b[0] == 128))
			key->sport = (__u16)b[4] << 8 | b[5];
		else if ((p == FT_PROTO_ICMP && b[0] == 0) || (p == FT_PROTO_ICMPV6 && b[0] == 129))
			key->dport = (__u16)b[4] << 8 | b[5];
		return;
	} else {
		return;
	}
	key->sport = (__u16)b[0] << 8 | b[1];
	key->dport = (__u16)b[2] << 8 | b[3];
}

static __always_inline void count_ipv4(struct __sk_buff *skb, __u32 l2_len, __u8 dir)
{
	struct flow_key key = {};
	struct ft_ipv4 ip;
	__u32 flags = 0;
	__u32 ihl;

	if (load(skb, l2_len, &ip, sizeof(ip)) < 0)
		return;
	if ((ip.vhl >> 4) != 4)
		return;
	ihl = (ip.vhl & 0x0f) * 4;
	if (ihl < sizeof(ip))
		return;
	__builtin_memcpy(key.src, ip.saddr, 4);
	__builtin_memcpy(key.dst, ip.daddr, 4);
	key.proto = ip.proto;
	key.family = 4;
	key.dir = dir;
	key.ifindex = skb->ifindex;
	/* Non-first fragments carry no transport header: ports stay 0. */
	if ((bpf_ntohs(ip.frag_off) & 0x1fff) == 0) {
		parse_l4(skb, l2_len + ihl, &key, &flags);
		dns_check(skb, l2_len + ihl, &key);
	}
	record(skb, &key, l2_len, flags);
}

static __always_inline void count_ipv6(struct __sk_buff *skb, __u32 l2_len, __u8 dir)
{
	struct flow_key key = {};
	struct ft_ipv6 ip;
	__u32 flags = 0;
	__u32 off = l2_len + sizeof(ip);
	__u8 nh;
	int fragment = 0;

	if (load(skb, l2_len, &ip, sizeof(ip)) < 0)
		return;
	if ((bpf_ntohl(ip.vtc_flow) >> 28) != 6)
		return;
	__builtin_memcpy(key.src, ip.saddr, 16);
	__builtin_memcpy(key.dst, ip.daddr, 16);
	key.family = 6;
	key.dir = dir;
	key.ifindex = skb->ifindex;
	nh = ip.nexthdr;

#pragma unroll
	for (int i = 0; i < FT_MAX_EXT_HDRS; i++) {
		__u8 ext[4] = {};

		if (nh != FT_NH_HOPOPTS && nh != FT_NH_ROUTING && nh != FT_NH_DSTOPTS &&
		    nh != FT_NH_FRAGMENT && nh != FT_NH_AH)
			break;
		if (load(skb, off, ext, sizeof(ext)) < 0)
			break;
		if (nh == FT_NH_FRAGMENT) {
			/* Offset != 0: a later fragment, without transport header. */
			if (((ext[2] << 8 | ext[3]) & 0xfff8) != 0)
				fragment = 1;
			off += 8;
		} else if (nh == FT_NH_AH) {
			off += ((__u32)ext[1] + 2) * 4;
		} else {
			off += ((__u32)ext[1] + 1) * 8;
		}
		nh = ext[0];
		if (fragment)
			break;
	}
	/* More extension headers than we walk: counted under the last one. */
	key.proto = nh;
	if (!fragment) {
		parse_l4(skb, off, &key, &flags);
		dns_check(skb, off, &key);
	}
	record(skb, &key, l2_len, flags);
}

static __always_inline int count(struct __sk_buff *skb, __u32 l2_len, __u8 dir)
{
	__u16 proto = bpf_ntohs((__u16)skb->protocol);

	if (proto == FT_ETH_P_IP)
		count_ipv4(skb, l2_len, dir);
	else if (proto == FT_ETH_P_IPV6)
		count_ipv6(skb, l2_len, dir);
	/* Anything else (ARP, VLAN-tagged frames not yet untagged, ...) is not
	 * counted here: tagged frames are counted on their VLAN interface. */
	return TC_ACT_UNSPEC;
}

/* Ethernet-like devices (veth, physical NICs, bridges, VLANs, vxlan, lo). */
SEC("classifier")
int flowtel_in_eth(struct __sk_buff *skb)
{
	return count(skb, FT_ETH_HLEN, FT_DIR_INGRESS);
}

SEC("classifier")
int flowtel_out_eth(struct __sk_buff *skb)
{
	return count(skb, FT_ETH_HLEN, FT_DIR_EGRESS);
}

/* Devices without an L2 header (WireGuard, tun, ipip, sit): data starts at
 * the IP header. */
SEC("classifier")
int flowtel_in_ip(struct __sk_buff *skb)
{
	return count(skb, 0, FT_DIR_INGRESS);
}

SEC("classifier")
int flowtel_out_ip(struct __sk_buff *skb)
{
	return count(skb, 0, FT_DIR_EGRESS);
}

/* No GPL-only helper is used, so the project's own licence is fine here. */
char LICENSE[] SEC("license") = "Apache-2.0";
