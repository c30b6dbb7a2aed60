// A tight loop of one system call, timed: how much each costs.
// Usage: loop N getppid|write  -> prints nanoseconds per call.
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	long n = atol(argv[1]);
	int writes = strcmp(argv[2], "write") == 0;
	int fd = open("/dev/null", O_WRONLY);
	if (fd < 0 || n <= 0)
		return 1;
	char byte = 'x';
	struct timespec a, z;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) {
		if (writes) {
			if (write(fd, &byte, 1) != 1)
				return 1;
		} else {
			syscall(SYS_getppid);
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &z);
	double ns = (z.tv_sec - a.tv_sec) * 1e9 + (z.tv_nsec - a.tv_nsec);
	printf("%.1f\n", ns / n);
	return 0;
}
