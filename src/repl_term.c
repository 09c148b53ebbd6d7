/* repl_term: the terminal and script front end of `netra repl` (see
 * repl_term.h). */
#include "repl_term.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <editline/readline.h>

/* The evaluator completion asks; one prompt per process. */
static const rterm_evaluator *active;
static char **matches;

void rterm_history_path(char *out, size_t size) {
    const char *state = getenv("XDG_STATE_HOME");
    const char *home = getenv("HOME");
    if (state && *state) snprintf(out, size, "%s/netra/history", state);
    else if (home && *home)
        snprintf(out, size, "%s/.local/state/netra/history", home);
    else if (size) out[0] = '\0';
}

/* mkdir -p for the directory holding path (mode 0700 for new ones). */
static void make_parents(const char *path) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash) return;
    *slash = '\0';
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        mkdir(dir, 0700);
        *p = '/';
    }
    mkdir(dir, 0700);
}

static void show(FILE *out, const char *text) {
    if (!text || !*text) return;
    fputs(text, out);
    if (text[strlen(text) - 1] != '\n') fputc('\n', out);
    fflush(out);
}

/* Appends line (and a newline) to the chunk being built. */
static char *append(char *chunk, const char *line) {
    size_t a = chunk ? strlen(chunk) : 0, b = strlen(line);
    char *grown = realloc(chunk, a + b + 2);
    if (!grown) {
        free(chunk);
        return NULL;
    }
    if (a) grown[a++] = '\n';
    memcpy(grown + a, line, b + 1);
    return grown;
}

/* ---- script ---------------------------------------------------------------- */

static int run_script(const rterm_evaluator *ev) {
    char *line = NULL, *chunk = NULL;
    size_t cap = 0;
    ssize_t n;
    int rc = 0;
    while ((n = getline(&line, &cap, stdin)) >= 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = '\0';
        if (!chunk && strspn(line, " \t") == (size_t)n) continue;
        chunk = append(chunk, line);
        if (!chunk) {
            fprintf(stderr, "netra repl: out of memory\n");
            rc = 1;
            break;
        }
        char *text = NULL;
        repl_status st = ev->eval(ev->ud, chunk, &text);
        if (st == REPL_INCOMPLETE) {
            free(text);
            continue;
        }
        free(chunk);
        chunk = NULL;
        if (st == REPL_ERROR) {
            show(stderr, text ? text : "error");
            free(text);
            rc = 1;
            break;
        }
        show(stdout, text);
        free(text);
    }
    if (chunk) {
        fprintf(stderr, "netra repl: input ended inside an unfinished chunk:"
                        "\n%s\n", chunk);
        free(chunk);
        rc = 1;
    }
    free(line);
    return rc;
}

/* ---- terminal ------------------------------------------------------------- */

static char *next_match(const char *text, int state) {
    static size_t i;
    (void)text;
    if (state == 0) i = 0;
    if (!matches || !matches[i]) return NULL;
    return strdup(matches[i++]);
}

static char **attempt(const char *text, int start, int end) {
    (void)start;
    rl_attempted_completion_over = 1;
    repl_free_list(matches);
    matches = NULL;
    char line[4096];
    int len = end < (int)sizeof line - 1 ? end : (int)sizeof line - 1;
    snprintf(line, sizeof line, "%.*s", len, rl_line_buffer);
    matches = active->complete(active->ud, line);
    if (!matches) return NULL;
    return rl_completion_matches(text, next_match);
}

static int run_terminal(const rterm_evaluator *ev) {
    char history[4096];
    rterm_history_path(history, sizeof history);
    active = ev;
    rl_readline_name = "netra";
    rl_attempted_completion_function = attempt;
    static char breaks[] = " \t\n\"'`@$><=;|&{(,+-*/%^~#[]";
    rl_basic_word_break_characters = breaks;
    rl_completer_word_break_characters = breaks;
    rl_completion_append_character = '\0';
    using_history();
    stifle_history(1000);
    if (history[0]) {
        make_parents(history);
        read_history(history);
    }

    char *chunk = NULL;
    for (;;) {
        char *line = readline(chunk ? ">> " : "> ");
        if (!line) {
            fputc('\n', stdout);
            break;
        }
        if (!chunk && strspn(line, " \t") == strlen(line)) {
            free(line);
            continue;
        }
        chunk = append(chunk, line);
        free(line);
        if (!chunk) break;
        char *text = NULL;
        repl_status st = ev->eval(ev->ud, chunk, &text);
        if (st == REPL_INCOMPLETE) {
            free(text);
            continue;
        }
        add_history(chunk);
        if (history[0] && write_history(history) != 0)
            fprintf(stderr, "netra repl: cannot write history %s: %s\n",
                    history, strerror(errno));
        free(chunk);
        chunk = NULL;
        show(st == REPL_ERROR ? stderr : stdout, text);
        free(text);
    }
    free(chunk);
    repl_free_list(matches);
    matches = NULL;
    active = NULL;
    return 0;
}

int rterm_run(const rterm_evaluator *ev, const char *banner,
              const char *notice) {
    bool tty = isatty(STDIN_FILENO);
    if (tty) {
        if (banner) show(stdout, banner);
        if (notice) show(stdout, notice);
        return run_terminal(ev);
    }
    if (notice) show(stderr, notice);
    return run_script(ev);
}
