/* peftref core: the expression language of plugin descriptors (see expr.h).
 *
 * One recursive-descent parser serves three modes: float evaluation,
 * integer evaluation (shapes: 64-bit arithmetic with overflow checks,
 * integer literals only, truncating '/' and '%', no sqrt) and a check
 * mode that knows only which names exist, not their values.  Every error
 * names the column (1-based) where it was found. */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "expr.h"

/* Bounds the recursion on hostile input such as "((((((...". */
#define EXPR_MAX_DEPTH 64

typedef enum { MODE_FLOAT, MODE_INT, MODE_CHECK } expr_mode;

typedef struct parser {
    const char *src;
    size_t pos;
    expr_mode mode;
    int int_rules;               /* integer-mode rules apply (MODE_INT, or check of a shape) */
    int allow_zero;              /* a shape's dimensions may be 0 (an absent frozen buffer) */
    const expr_var *vars;
    int n_vars;
    const char *const *names;    /* MODE_CHECK */
    int n_names;
    int depth;
    char *err;
    size_t errlen;
    int failed;
} parser;

/* A value in whichever mode the parser runs (check mode carries none). */
typedef struct value {
    double f;
    int64_t i;
} value;

static int fail(parser *p, size_t pos, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static int fail(parser *p, size_t pos, const char *fmt, ...)
{
    if (p->failed)
        return -1;
    p->failed = 1;
    if (p->err && p->errlen) {
        char msg[256];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        snprintf(p->err, p->errlen, "%s at column %zu", msg, pos + 1);
    }
    return -1;
}

static void skip_space(parser *p)
{
    while (p->src[p->pos] == ' ' || p->src[p->pos] == '\t' || p->src[p->pos] == '\n' ||
           p->src[p->pos] == '\r')
        p->pos++;
}

static int is_name_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static int is_name_char(char c)
{
    return is_name_start(c) || (c >= '0' && c <= '9');
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Describe the character at pos for "unexpected ..." messages. */
static void describe_at(const parser *p, size_t pos, char *buf, size_t len)
{
    unsigned char c = (unsigned char)p->src[pos];
    if (c == '\0')
        snprintf(buf, len, "end of expression");
    else if (c >= 0x20 && c < 0x7f)
        snprintf(buf, len, "'%c'", c);
    else
        snprintf(buf, len, "byte 0x%02x", c);
}

static int unexpected(parser *p, const char *wanted)
{
    char what[32];
    describe_at(p, p->pos, what, sizeof what);
    if (wanted)
        return fail(p, p->pos, "expected %s, found %s", wanted, what);
    return fail(p, p->pos, "unexpected %s", what);
}

static int parse_expr(parser *p, value *out);

static int parse_number(parser *p, value *out)
{
    size_t start = p->pos, i = p->pos;
    while (is_digit(p->src[i]))
        i++;
    int is_float = 0;
    if (p->src[i] == '.') {
        is_float = 1;
        i++;
        while (is_digit(p->src[i]))
            i++;
    }
    if (p->src[i] == 'e' || p->src[i] == 'E') {
        size_t j = i + 1;
        if (p->src[j] == '+' || p->src[j] == '-')
            j++;
        if (is_digit(p->src[j])) {
            is_float = 1;
            i = j;
            while (is_digit(p->src[i]))
                i++;
        }
    }
    if (i == start || (i == start + 1 && p->src[start] == '.'))
        return fail(p, start, "malformed number");
    if (is_name_char(p->src[i]) || p->src[i] == '.')
        return fail(p, i, "malformed number '%.*s'", (int)(i - start + 1), p->src + start);
    size_t len = i - start;
    if (p->int_rules && is_float)
        return fail(p, start, "'%.*s' is not an integer (shape expressions use integers only)", (int)len,
                    p->src + start);
    char buf[64];
    if (len >= sizeof buf)
        return fail(p, start, "number too long");
    memcpy(buf, p->src + start, len);
    buf[len] = '\0';
    p->pos = i;
    if (p->mode == MODE_INT) {
        errno = 0;
        char *end = NULL;
        long long v = strtoll(buf, &end, 10);
        if (errno == ERANGE)
            return fail(p, start, "integer %s is too large", buf);
        out->i = (int64_t)v;
    } else if (p->mode == MODE_FLOAT) {
        errno = 0;
        double v = strtod(buf, NULL);
        if (errno == ERANGE && isinf(v))
            return fail(p, start, "number %s is too large", buf);
        out->f = v;
    }
    return 0;
}

static int lookup_name(parser *p, size_t start, size_t len, value *out)
{
    if (p->mode == MODE_CHECK) {
        for (int k = 0; k < p->n_names; k++)
            if (p->names[k] && strlen(p->names[k]) == len && memcmp(p->names[k], p->src + start, len) == 0)
                return 0;
        return fail(p, start, "unknown name '%.*s'", (int)len, p->src + start);
    }
    /* The last definition wins, so a caller may append overrides. */
    for (int k = p->n_vars - 1; k >= 0; k--) {
        const char *n = p->vars[k].name;
        if (!n || strlen(n) != len || memcmp(n, p->src + start, len) != 0)
            continue;
        double v = p->vars[k].value;
        if (p->mode == MODE_FLOAT) {
            out->f = v;
            return 0;
        }
        if (!isfinite(v) || v != floor(v) || v < -9.2e18 || v > 9.2e18)
            return fail(p, start, "'%.*s' is %g, not an integer", (int)len, p->src + start, v);
        out->i = (int64_t)v;
        return 0;
    }
    return fail(p, start, "unknown name '%.*s'", (int)len, p->src + start);
}

static int parse_call(parser *p, size_t start, size_t len, value *out)
{
    const char *name = p->src + start;
    int want;
    if (len == 3 && memcmp(name, "min", 3) == 0)
        want = 2;
    else if (len == 3 && memcmp(name, "max", 3) == 0)
        want = 2;
    else if (len == 4 && memcmp(name, "sqrt", 4) == 0) {
        if (p->int_rules)
            return fail(p, start, "sqrt is not allowed in an integer (shape) expression");
        want = 1;
    } else
        return fail(p, start, "unknown function '%.*s' (known: min, max, sqrt)", (int)len, name);

    value args[2] = {{0, 0}, {0, 0}};
    int n = 0;
    p->pos++; /* '(' */
    for (;;) {
        skip_space(p);
        if (n == 0 && p->src[p->pos] == ')')
            break;
        value v = {0, 0};
        if (parse_expr(p, &v))
            return -1;
        if (n < 2)
            args[n] = v;
        n++;
        skip_space(p);
        if (p->src[p->pos] == ',') {
            p->pos++;
            continue;
        }
        if (p->src[p->pos] == ')')
            break;
        return unexpected(p, "',' or ')'");
    }
    if (n != want)
        return fail(p, start, "%.*s takes %d argument%s, given %d", (int)len, name, want, want == 1 ? "" : "s", n);
    p->pos++; /* ')' */
    if (p->mode == MODE_CHECK)
        return 0;
    if (want == 1) {
        if (args[0].f < 0)
            return fail(p, start, "sqrt of a negative number (%g)", args[0].f);
        out->f = sqrt(args[0].f);
    } else if (name[1] == 'i') {
        out->f = args[0].f < args[1].f ? args[0].f : args[1].f;
        out->i = args[0].i < args[1].i ? args[0].i : args[1].i;
    } else {
        out->f = args[0].f > args[1].f ? args[0].f : args[1].f;
        out->i = args[0].i > args[1].i ? args[0].i : args[1].i;
    }
    return 0;
}

static int parse_atom(parser *p, value *out)
{
    skip_space(p);
    char c = p->src[p->pos];
    if (is_digit(c) || (c == '.' && is_digit(p->src[p->pos + 1])))
        return parse_number(p, out);
    if (is_name_start(c)) {
        size_t start = p->pos;
        while (is_name_char(p->src[p->pos]))
            p->pos++;
        size_t len = p->pos - start;
        size_t after = p->pos;
        skip_space(p);
        if (p->src[p->pos] == '(')
            return parse_call(p, start, len, out);
        p->pos = after;
        return lookup_name(p, start, len, out);
    }
    if (c == '(') {
        size_t open = p->pos;
        p->pos++;
        if (parse_expr(p, out))
            return -1;
        skip_space(p);
        if (p->src[p->pos] != ')') {
            if (p->src[p->pos] == '\0')
                return fail(p, open, "unclosed '('");
            return unexpected(p, "')'");
        }
        p->pos++;
        return 0;
    }
    if (c == '\0')
        return fail(p, p->pos, p->pos == 0 ? "empty expression" : "expression ends too early");
    return unexpected(p, "a number, a name or '('");
}

static int parse_unary(parser *p, value *out)
{
    skip_space(p);
    if (p->src[p->pos] != '-')
        return parse_atom(p, out);
    size_t op = p->pos;
    p->pos++;
    if (++p->depth > EXPR_MAX_DEPTH)
        return fail(p, op, "expression nested too deeply");
    int rc = parse_unary(p, out);
    p->depth--;
    if (rc)
        return -1;
    if (p->mode == MODE_INT) {
        if (out->i == INT64_MIN)
            return fail(p, op, "integer overflow in negation");
        out->i = -out->i;
    } else {
        out->f = -out->f;
    }
    return 0;
}

static int apply_int(parser *p, char op, size_t at, int64_t a, int64_t b, int64_t *r)
{
    switch (op) {
    case '+':
        if (__builtin_add_overflow(a, b, r))
            return fail(p, at, "integer overflow in %lld + %lld", (long long)a, (long long)b);
        return 0;
    case '-':
        if (__builtin_sub_overflow(a, b, r))
            return fail(p, at, "integer overflow in %lld - %lld", (long long)a, (long long)b);
        return 0;
    case '*':
        if (__builtin_mul_overflow(a, b, r))
            return fail(p, at, "integer overflow in %lld * %lld", (long long)a, (long long)b);
        return 0;
    default: /* '/' and '%' */
        if (b == 0)
            return fail(p, at, "division by zero");
        if (a == INT64_MIN && b == -1)
            return fail(p, at, "integer overflow in %lld %c -1", (long long)a, op);
        *r = op == '/' ? a / b : a % b;
        return 0;
    }
}

static int apply_float(parser *p, char op, size_t at, double a, double b, double *r)
{
    switch (op) {
    case '+': *r = a + b; break;
    case '-': *r = a - b; break;
    case '*': *r = a * b; break;
    default:
        if (b == 0)
            return fail(p, at, "division by zero");
        *r = op == '/' ? a / b : fmod(a, b);
        break;
    }
    if (!isfinite(*r))
        return fail(p, at, "result of '%c' is not finite", op);
    return 0;
}

static int parse_term(parser *p, value *out)
{
    if (parse_unary(p, out))
        return -1;
    for (;;) {
        skip_space(p);
        char op = p->src[p->pos];
        if (op != '*' && op != '/' && op != '%')
            return 0;
        size_t at = p->pos++;
        value rhs = {0, 0};
        if (parse_unary(p, &rhs))
            return -1;
        if (p->mode == MODE_INT) {
            if (apply_int(p, op, at, out->i, rhs.i, &out->i))
                return -1;
        } else if (p->mode == MODE_FLOAT) {
            if (apply_float(p, op, at, out->f, rhs.f, &out->f))
                return -1;
        }
    }
}

static int parse_expr(parser *p, value *out)
{
    if (++p->depth > EXPR_MAX_DEPTH)
        return fail(p, p->pos, "expression nested too deeply");
    if (parse_term(p, out))
        return -1;
    for (;;) {
        skip_space(p);
        char op = p->src[p->pos];
        if (op != '+' && op != '-')
            break;
        size_t at = p->pos++;
        value rhs = {0, 0};
        if (parse_term(p, &rhs))
            return -1;
        if (p->mode == MODE_INT) {
            if (apply_int(p, op, at, out->i, rhs.i, &out->i))
                return -1;
        } else if (p->mode == MODE_FLOAT) {
            if (apply_float(p, op, at, out->f, rhs.f, &out->f))
                return -1;
        }
    }
    p->depth--;
    return 0;
}

static void parser_init(parser *p, const char *src, expr_mode mode, int int_rules, char *err, size_t errlen)
{
    memset(p, 0, sizeof *p);
    p->src = src;
    p->mode = mode;
    p->int_rules = int_rules;
    p->err = err;
    p->errlen = errlen;
    if (err && errlen)
        err[0] = '\0';
}

/* One whole expression: everything up to the end of src must be consumed. */
static int parse_whole(parser *p, value *out)
{
    if (!p->src)
        return fail(p, 0, "missing expression");
    if (parse_expr(p, out))
        return -1;
    skip_space(p);
    if (p->src[p->pos] != '\0') {
        if (p->src[p->pos] == ')')
            return fail(p, p->pos, "unmatched ')'");
        char what[32];
        describe_at(p, p->pos, what, sizeof what);
        return fail(p, p->pos, "unexpected %s after the end of the expression", what);
    }
    return 0;
}

/* A shape: 1..4 comma-separated integer expressions, each >= 1 when
 * evaluated.  Check mode parses without evaluating. */
static int parse_shape(parser *p, int64_t dims[4], int *ndim)
{
    if (!p->src)
        return fail(p, 0, "missing shape expression");
    int n = 0;
    int64_t numel = 1;
    for (;;) {
        size_t start = p->pos;
        value v = {0, 0};
        if (parse_expr(p, &v))
            return -1;
        if (n == 4)
            return fail(p, start, "a shape has at most 4 dimensions");
        if (p->mode == MODE_INT) {
            if (v.i < (p->allow_zero ? 0 : 1)) {
                size_t end = p->pos;
                while (end > start && (p->src[end - 1] == ' ' || p->src[end - 1] == '\t'))
                    end--;
                while (p->src[start] == ' ' || p->src[start] == '\t')
                    start++;
                return fail(p, start, "dimension %d ('%.*s') is %lld; every dimension must be >= %d", n + 1,
                            (int)(end - start), p->src + start, (long long)v.i, p->allow_zero ? 0 : 1);
            }
            if (__builtin_mul_overflow(numel, v.i, &numel) || numel > EXPR_MAX_NUMEL) {
                while (p->src[start] == ' ' || p->src[start] == '\t')
                    start++;
                return fail(p, start, "the shape has more than %lld elements (EXPR_MAX_NUMEL) with dimension %d "
                            "(%lld)", (long long)EXPR_MAX_NUMEL, n + 1, (long long)v.i);
            }
            dims[n] = v.i;
        }
        n++;
        skip_space(p);
        if (p->src[p->pos] == ',') {
            p->pos++;
            continue;
        }
        if (p->src[p->pos] == '\0')
            break;
        if (p->src[p->pos] == ')')
            return fail(p, p->pos, "unmatched ')'");
        char what[32];
        describe_at(p, p->pos, what, sizeof what);
        return fail(p, p->pos, "unexpected %s after dimension %d", what, n);
    }
    *ndim = n;
    return 0;
}

int expr_eval(const char *src, const expr_var *vars, int n_vars, double *out, char *err, size_t errlen)
{
    parser p;
    parser_init(&p, src, MODE_FLOAT, 0, err, errlen);
    p.vars = vars;
    p.n_vars = n_vars;
    value v = {0, 0};
    if (parse_whole(&p, &v))
        return -1;
    *out = v.f;
    return 0;
}

int expr_eval_int(const char *src, const expr_var *vars, int n_vars, int64_t *out, char *err, size_t errlen)
{
    parser p;
    parser_init(&p, src, MODE_INT, 1, err, errlen);
    p.vars = vars;
    p.n_vars = n_vars;
    value v = {0, 0};
    if (parse_whole(&p, &v))
        return -1;
    *out = v.i;
    return 0;
}

int expr_eval_shape(const char *src, const expr_var *vars, int n_vars, int64_t dims[4], int *ndim, char *err,
                    size_t errlen)
{
    return expr_eval_shape_z(src, vars, n_vars, 0, dims, ndim, err, errlen);
}

int expr_eval_shape_z(const char *src, const expr_var *vars, int n_vars, int allow_zero, int64_t dims[4], int *ndim,
                      char *err, size_t errlen)
{
    parser p;
    parser_init(&p, src, MODE_INT, 1, err, errlen);
    p.allow_zero = allow_zero;
    p.vars = vars;
    p.n_vars = n_vars;
    int64_t d[4] = {0, 0, 0, 0};
    int n = 0;
    if (parse_shape(&p, d, &n))
        return -1;
    memcpy(dims, d, sizeof d);
    *ndim = n;
    return 0;
}

int expr_check(const char *src, const char *const *names, int n_names, int shape, char *err, size_t errlen)
{
    parser p;
    parser_init(&p, src, MODE_CHECK, shape != 0, err, errlen);
    p.names = names;
    p.n_names = n_names;
    if (shape) {
        int64_t d[4];
        int n = 0;
        return parse_shape(&p, d, &n);
    }
    value v = {0, 0};
    return parse_whole(&p, &v);
}
