// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// flowtel's CNI plugin executions. BTF tracepoints (tp_btf), which need
// neither kprobes nor a mounted tracefs:
//
//   sched_process_exec  a binary under one of the CNI bin directories
//                       (`bin_dirs`, written by userspace) starts: its path,
//                       parent and environment (the first 16 KiB), which
//                       holds CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS,
//                       CNI_ARGS, CNI_IFNAME and CNI_PATH
//   sys_enter           write(1, ...) of a running plugin: its stdout, the
//                       ADD result or the error JSON
//   sched_process_exit  the last thread of a running plugin exits: its exit
//                       status
//
// The environment is read in the kernel at exec, while it is certainly
// there, so a plugin that exits at once loses nothing. Running plugins are
// kept in `running` (by process id) from exec to exit. Whatever cannot be
// delivered (ring buffer or `running` full) is counted in `lost`.
//
// Licensed GPL-compatible (Dual BSD/GPL) because bpf_probe_read_* and
// tracing programs are only available to GPL-compatible programs.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

/* Event kinds, mirrored by `Kind` in src/source/cni/raw.rs. */
#define FT_CNI_EXEC 1
#define FT_CNI_OUTPUT 2
#define FT_CNI_EXIT 3

#define FT_PATH_MAX 256
#define FT_DIR_MAX 128
#define FT_DIRS 8
#define FT_ENV_MAX 16384
#define FT_OUT_MAX 4096

#define FT_NR_WRITE 1 /* x86_64 */

/* Indexes of `lost`. */
#define FT_LOST_EXEC 0 /* ring buffer full: an execution not reported */
#define FT_LOST_OUTPUT 1 /* ring buffer full: a write not reported */
#define FT_LOST_EXIT 2 /* ring buffer full: an exit not reported */
#define FT_LOST_UNTRACKED 3 /* `running` full: an execution not reported */
#define FT_LOST_N 4

/* A bin directory with its trailing '/'; len 0: unused slot. */
struct ft_dir {
	__u32 len;
	char path[FT_DIR_MAX];
};

/* The header of every event, mirrored by `Header`. */
struct ft_cni_header {
	__u32 kind; /* FT_CNI_* */
	__u32 pid; /* process id (tgid) */
	__u32 ppid; /* the parent's process id, on exec */
	__s32 status; /* the wait status, on exit */
	__u64 ts_ns; /* bpf_ktime_get_ns */
	__u32 len; /* bytes used of the payload (env or output) */
	__u32 truncated; /* the payload was longer than the buffer */
};

/* Mirrored by `ExecEvent`. */
struct ft_cni_exec {
	struct ft_cni_header h;
	char path[FT_PATH_MAX];
	char env[FT_ENV_MAX];
};

/* Mirrored by `OutputEvent`. */
struct ft_cni_output {
	struct ft_cni_header h;
	char data[FT_OUT_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FT_DIRS);
	__type(key, __u32);
	__type(value, struct ft_dir);
} bin_dirs SEC(".maps");

/* Where an exec record is built before it is copied, with only the bytes
 * used, into the ring buffer. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ft_cni_exec);
} scratch SEC(".maps");

/* Running plugins: process id -> exec time. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} running SEC(".maps");

/* max_entries (bytes) is set by userspace before loading. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} cni_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FT_LOST_N);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

static __always_inline void count_lost(__u32 what)
{
	__u64 *v = bpf_map_lookup_elem(&lost, &what);
	if (v)
		*v += 1;
}

static __always_inline int under_bin_dir(const char *path)
{
	for (__u32 i = 0; i < FT_DIRS; i++) {
		__u32 k = i;
		struct ft_dir *d = bpf_map_lookup_elem(&bin_dirs, &k);
		if (!d || d->len == 0 || d->len >= FT_DIR_MAX)
			continue;
		int match = 1;
		for (__u32 j = 0; j < FT_DIR_MAX; j++) {
			if (j >= d->len)
				break;
			if (path[j] != d->path[j]) {
				match = 0;
				break;
			}
		}
		if (match)
			return 1;
	}
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(flowtel_cni_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	__u32 zero = 0;
	struct ft_cni_exec *e = bpf_map_lookup_elem(&scratch, &zero);
	if (!e)
		return 0;
	const char *filename = BPF_CORE_READ(bprm, filename);
	if (bpf_probe_read_kernel_str(e->path, sizeof(e->path), filename) <= 0)
		return 0;
	if (!under_bin_dir(e->path))
		return 0;

	__u32 pid = BPF_CORE_READ(p, tgid);
	__u64 now = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&running, &pid, &now, BPF_ANY) != 0) {
		count_lost(FT_LOST_UNTRACKED);
		return 0;
	}
	e->h.kind = FT_CNI_EXEC;
	e->h.pid = pid;
	e->h.ppid = BPF_CORE_READ(p, real_parent, tgid);
	e->h.status = 0;
	e->h.ts_ns = now;

	/* The whole environment up to FT_ENV_MAX - 1 bytes: libcni builds it
	 * from a map, so the CNI variables may be anywhere in it. */
	unsigned long start = BPF_CORE_READ(p, mm, env_start);
	unsigned long end = BPF_CORE_READ(p, mm, env_end);
	__u64 len = end > start ? end - start : 0;
	e->h.truncated = 0;
	if (len > FT_ENV_MAX - 1) {
		len = FT_ENV_MAX - 1;
		e->h.truncated = 1;
	}
	len &= FT_ENV_MAX - 1;
	if (bpf_probe_read_user(e->env, len, (const void *)start) != 0)
		len = 0;
	e->h.len = len;
	__u64 size = sizeof(e->h) + FT_PATH_MAX + (len & (FT_ENV_MAX - 1));
	if (bpf_ringbuf_output(&cni_events, e, size, 0) != 0) {
		/* Not reported, so its exit is not either. */
		bpf_map_delete_elem(&running, &pid);
		count_lost(FT_LOST_EXEC);
	}
	return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(flowtel_cni_write, struct pt_regs *regs, long id)
{
	if (id != FT_NR_WRITE)
		return 0;
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	if (!bpf_map_lookup_elem(&running, &pid))
		return 0;
	if (BPF_CORE_READ(regs, di) != 1)
		return 0;
	const void *buf = (const void *)BPF_CORE_READ(regs, si);
	__u64 count = BPF_CORE_READ(regs, dx);

	struct ft_cni_output *e = bpf_ringbuf_reserve(&cni_events, sizeof(*e), 0);
	if (!e) {
		count_lost(FT_LOST_OUTPUT);
		return 0;
	}
	e->h.kind = FT_CNI_OUTPUT;
	e->h.pid = pid;
	e->h.ppid = 0;
	e->h.status = 0;
	e->h.ts_ns = bpf_ktime_get_ns();
	e->h.truncated = 0;
	if (count > FT_OUT_MAX - 1) {
		count = FT_OUT_MAX - 1;
		e->h.truncated = 1;
	}
	count &= FT_OUT_MAX - 1;
	if (bpf_probe_read_user(e->data, count, buf) != 0)
		count = 0;
	e->h.len = count;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(flowtel_cni_exit, struct task_struct *p, bool group_dead)
{
	if (!group_dead)
		return 0;
	__u32 pid = BPF_CORE_READ(p, tgid);
	if (!bpf_map_lookup_elem(&running, &pid))
		return 0;
	bpf_map_delete_elem(&running, &pid);
	struct ft_cni_header *e = bpf_ringbuf_reserve(&cni_events, sizeof(*e), 0);
	if (!e) {
		count_lost(FT_LOST_EXIT);
		return 0;
	}
	e->kind = FT_CNI_EXIT;
	e->pid = pid;
	e->ppid = 0;
	e->status = BPF_CORE_READ(p, exit_code);
	e->ts_ns = bpf_ktime_get_ns();
	e->len = 0;
	e->truncated = 0;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
