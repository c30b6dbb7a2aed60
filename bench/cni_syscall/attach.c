// Loads a BPF object, attaches every program in it (libbpf: the section
// name says where) but the one named by $SKIP, runs a command and exits,
// which detaches them.
// Usage: [SKIP=PROGRAM] attach OBJECT COMMAND [ARGS...]
#include <bpf/libbpf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
	if (!obj || bpf_object__load(obj)) {
		fprintf(stderr, "loading %s failed\n", argv[1]);
		return 1;
	}
	const char *skip = getenv("SKIP");
	struct bpf_program *prog;
	bpf_object__for_each_program(prog, obj) {
		if (skip && strcmp(skip, bpf_program__name(prog)) == 0)
			continue;
		if (!bpf_program__attach(prog)) {
			fprintf(stderr, "attaching %s failed\n", bpf_program__name(prog));
			return 1;
		}
	}
	pid_t child = fork();
	if (child == 0) {
		execvp(argv[2], argv + 2);
		_exit(127);
	}
	int status = 0;
	waitpid(child, &status, 0);
	bpf_object__close(obj);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
