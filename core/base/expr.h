/* peftref core: the small expression language of plugin descriptors.
 *
 * Grammar (integers and floats, left-associative, usual precedence):
 *   expr   := term (('+' | '-') term)*
 *   term   := unary (('*' | '/' | '%') unary)*
 *   unary  := '-' unary | atom
 *   atom   := NUMBER | NAME | NAME '(' expr (',' expr)* ')' | '(' expr ')'
 * Functions: min(a,b), max(a,b), sqrt(a).  Names are looked up in the
 * variables given.  Shape expressions are evaluated in integer mode ('/'
 * is integer division, sqrt is refused, every dimension must be >= 1);
 * scale and init expressions in float mode. */
#ifndef PEFTREF_CORE_EXPR_H
#define PEFTREF_CORE_EXPR_H

#include <stddef.h>
#include <stdint.h>

typedef struct expr_var {
    const char *name;
    double value;
} expr_var;

/* Float-mode evaluation.  Returns 0 and *out, or -1 with a message in err
 * ("unknown name 'rr' at column 5", "division by zero", ...). */
int expr_eval(const char *src, const expr_var *vars, int n_vars, double *out, char *err, size_t errlen);

/* Integer-mode evaluation of one dimension. */
int expr_eval_int(const char *src, const expr_var *vars, int n_vars, int64_t *out, char *err, size_t errlen);

/* The most elements one evaluated shape may hold (the product of its
 * dimensions): that of the largest base weight matrix (config.c keeps
 * those below 2^31, which the kernels count in int).  A plugin's parameter
 * declaration is outside input; a shape past this is refused before
 * anything is allocated (docs/security.md). */
#define EXPR_MAX_NUMEL ((int64_t)INT32_MAX)

/* A comma-separated shape "r, d_in" (1..4 dimensions, each >= 1, their
 * product at most EXPR_MAX_NUMEL). */
int expr_eval_shape(const char *src, const expr_var *vars, int n_vars, int64_t dims[4], int *ndim,
                    char *err, size_t errlen);
/* The same, where allow_zero lets a dimension be 0: a frozen buffer a
 * module's options leave out (PR_PARAM_FROZEN; it holds no element). */
int expr_eval_shape_z(const char *src, const expr_var *vars, int n_vars, int allow_zero, int64_t dims[4],
                      int *ndim, char *err, size_t errlen);

/* Syntax check with the set of names that may appear (values unknown):
 * reports syntax errors and unknown names without evaluating. */
int expr_check(const char *src, const char *const *names, int n_names, int shape, char *err, size_t errlen);

#endif
