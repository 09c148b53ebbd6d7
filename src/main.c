/* main: the netra command line. */
#include <stdio.h>

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    puts("netra " NETRA_VERSION);
    return 0;
}
