// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// The candidate replacement of flowtel_cni_write (bpf/cni.bpf.c) measured by
// bench/cni_syscall_overhead.sh: the classic tracepoint
// syscalls/sys_enter_write (needs tracefs) instead of the raw BTF
// tracepoint sys_enter. Same filter: a write(1, ...) of a running plugin.
// Nothing is running in the benchmark, so the ring buffer part never runs
// and is left out.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} running SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_write")
int flowtel_cni_write_tp(struct trace_event_raw_sys_enter *ctx)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	if (!bpf_map_lookup_elem(&running, &pid))
		return 0;
	if (ctx->args[0] != 1)
		return 0;
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
