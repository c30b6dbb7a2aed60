// SPDX-License-Identifier: Apache-2.0
//
// Not part of flowtel: a stand-in for another vendor's TC program (Cilium's,
// a firewall's) in the coverage test (tests/ebpf_coverage.rs). It drops
// every fourth IPv4 UDP packet and passes everything else on.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define TC_ACT_UNSPEC (-1)
#define TC_ACT_SHOT 2

/* [0]: UDP packets seen, [1]: of them dropped. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

SEC("classifier")
int foreign_drop(struct __sk_buff *skb)
{
	__u32 seen = 0, dropped = 1;
	__u64 *n, *d;
	__u8 proto;

	if (skb->protocol != bpf_htons(0x0800))
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, 14 + 9, &proto, 1) < 0 || proto != 17)
		return TC_ACT_UNSPEC;
	n = bpf_map_lookup_elem(&counts, &seen);
	d = bpf_map_lookup_elem(&counts, &dropped);
	if (!n || !d)
		return TC_ACT_UNSPEC;
	if (__sync_fetch_and_add(n, 1) % 4 == 3) {
		__sync_fetch_and_add(d, 1);
		return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Apache-2.0";
