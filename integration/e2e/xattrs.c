/* Tiny static helper baked into the e2e test image: busybox has no getfattr.
 *   xattrs PATH...   prints "PATH NAME=HEXVALUE" for every user.* extended attribute of each PATH
 *                    (not following symlinks), names sorted; nothing for a path without any.
 * Exit status 1 if an attribute could not be read (a path without xattr support is not an error). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>

static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int main(int argc, char **argv) {
    int rc = 0;
    for (int i = 1; i < argc; i++) {
        static char list[65536];
        ssize_t n = llistxattr(argv[i], list, sizeof list);
        if (n < 0) {
            if (errno == ENOTSUP) continue;
            fprintf(stderr, "xattrs: %s: %s\n", argv[i], strerror(errno));
            rc = 1;
            continue;
        }
        char *names[1024];
        int count = 0;
        for (char *p = list; p < list + n && count < 1024; p += strlen(p) + 1)
            if (strncmp(p, "user.", 5) == 0) names[count++] = p;
        qsort(names, count, sizeof names[0], cmp);
        for (int j = 0; j < count; j++) {
            static unsigned char val[65536];
            ssize_t m = lgetxattr(argv[i], names[j], val, sizeof val);
            if (m < 0) {
                fprintf(stderr, "xattrs: %s: %s: %s\n", argv[i], names[j], strerror(errno));
                rc = 1;
                continue;
            }
            printf("%s %s=", argv[i], names[j]);
            for (ssize_t k = 0; k < m; k++) printf("%02x", val[k]);
            printf("\n");
        }
    }
    return rc;
}
