/* repl_term: the front end of `netra repl`: a prompt with line editing,
 * history and tab completion (libedit) when stdin is a terminal, or a
 * script read from stdin when it is not. It hands chunks to an evaluator
 * (a local session or an attached server) and prints what comes back.
 *
 * Only the netra binary links libedit: nothing but main.c may call
 * these functions. Threads: the main thread. */
#ifndef NETRA_REPL_TERM_H
#define NETRA_REPL_TERM_H

#include "repl.h"

typedef struct {
    void *ud;
    /* As repl_eval: *text malloc'd or NULL. */
    repl_status (*eval)(void *ud, const char *chunk, char **text);
    /* As repl_complete: NULL-terminated, freed with repl_free_list. */
    char **(*complete)(void *ud, const char *line);
} rterm_evaluator;

/* Runs the prompt or the script. `banner` is shown at an interactive
 * prompt only; `notice` (may be NULL) is shown first in both modes (on
 * stderr for a script). Returns the exit code: 0, or 1 when a script
 * chunk failed (its error on stderr; nothing after it runs) or ended
 * incomplete. */
int rterm_run(const rterm_evaluator *ev, const char *banner,
              const char *notice);

/* The history file: $XDG_STATE_HOME/netra/history, else
 * ~/.local/state/netra/history. Fills out (empty when neither HOME nor
 * XDG_STATE_HOME is set). */
void rterm_history_path(char *out, size_t size);

#endif
