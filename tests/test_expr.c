/* Tests of the descriptor expression language (core/base/expr.h): precedence,
 * integer and float modes, shapes, and the error messages with columns. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "expr.h"

static const expr_var vars[] = {
    {"d_model", 768}, {"d_in", 768}, {"d_out", 2304}, {"r", 8}, {"alpha", 16}, {"half", 0.5}, {"zero", 0},
    {"big", 4.0e18},
};
#define NV ((int)(sizeof vars / sizeof vars[0]))

static int64_t ival(const char *src)
{
    char err[256];
    int64_t v = -12345;
    int rc = expr_eval_int(src, vars, NV, &v, err, sizeof err);
    if (rc != 0)
        fail_msg("'%s' failed: %s", src, err);
    return v;
}

static double fval(const char *src)
{
    char err[256];
    double v = -12345;
    int rc = expr_eval(src, vars, NV, &v, err, sizeof err);
    if (rc != 0)
        fail_msg("'%s' failed: %s", src, err);
    return v;
}

/* Evaluation in integer mode must fail with a message containing want. */
static void int_fails(const char *src, const char *want)
{
    char err[256] = "";
    int64_t v = 0;
    assert_int_equal(expr_eval_int(src, vars, NV, &v, err, sizeof err), -1);
    if (!strstr(err, want))
        fail_msg("'%s': error '%s' lacks '%s'", src, err, want);
}

static void float_fails(const char *src, const char *want)
{
    char err[256] = "";
    double v = 0;
    assert_int_equal(expr_eval(src, vars, NV, &v, err, sizeof err), -1);
    if (!strstr(err, want))
        fail_msg("'%s': error '%s' lacks '%s'", src, err, want);
}

static void test_integer_arithmetic(void **state)
{
    (void)state;
    assert_int_equal(ival("1 + 2 * 3"), 7);
    assert_int_equal(ival("(1 + 2) * 3"), 9);
    assert_int_equal(ival("10 - 4 - 3"), 3);      /* left-associative */
    assert_int_equal(ival("100 / 10 / 5"), 2);
    assert_int_equal(ival("7 / 2"), 3);           /* integer division */
    assert_int_equal(ival("-7 / 2"), -3);         /* truncates toward zero */
    assert_int_equal(ival("7 % 3"), 1);
    assert_int_equal(ival("--5"), 5);
    assert_int_equal(ival("2 * -3"), -6);
    assert_int_equal(ival("r * (d_in + d_out)"), 8 * (768 + 2304));
    assert_int_equal(ival("min(r, 4) + max(d_in, d_out)"), 4 + 2304);
    assert_int_equal(ival("max(min(1, 2), min(3, 4))"), 3);
    assert_int_equal(ival("  d_model/r\t"), 96);
    assert_int_equal(ival("9000000000 * 1000000000"), 9000000000000000000LL);
}

static void test_float_arithmetic(void **state)
{
    (void)state;
    assert_true(fabs(fval("alpha / r") - 2.0) < 1e-12);
    assert_true(fabs(fval("alpha / sqrt(r)") - 16.0 / sqrt(8.0)) < 1e-12);
    assert_true(fabs(fval("7 / 2") - 3.5) < 1e-12);
    assert_true(fabs(fval("1.5e2 + .5") - 150.5) < 1e-12);
    assert_true(fabs(fval("half * 4") - 2.0) < 1e-12);
    assert_true(fabs(fval("sqrt(6 / ((1 + 5) * d_in))") - sqrt(1.0 / 768)) < 1e-12);
    assert_true(fabs(fval("7 % 2.5") - 2.0) < 1e-12);
    assert_true(fabs(fval("-min(1, 2.5)") + 1.0) < 1e-12);
}

static void test_shapes(void **state)
{
    (void)state;
    char err[256];
    int64_t d[4] = {0};
    int nd = 0;
    assert_int_equal(expr_eval_shape("r, d_in", vars, NV, d, &nd, err, sizeof err), 0);
    assert_int_equal(nd, 2);
    assert_int_equal(d[0], 8);
    assert_int_equal(d[1], 768);
    assert_int_equal(expr_eval_shape("max(r, 2), 1, 2, d_out / 3", vars, NV, d, &nd, err, sizeof err), 0);
    assert_int_equal(nd, 4);
    assert_int_equal(d[0], 8);
    assert_int_equal(d[3], 768);

    assert_int_equal(expr_eval_shape("1, 2, 3, 4, 5", vars, NV, d, &nd, err, sizeof err), -1);
    assert_non_null(strstr(err, "at most 4 dimensions"));
    assert_int_equal(expr_eval_shape("r, r - 8", vars, NV, d, &nd, err, sizeof err), -1);
    assert_non_null(strstr(err, "dimension 2 ('r - 8') is 0"));
    assert_non_null(strstr(err, "column 4"));
    assert_int_equal(expr_eval_shape("r,, d_in", vars, NV, d, &nd, err, sizeof err), -1);
    assert_non_null(strstr(err, "column 3"));
    assert_int_equal(expr_eval_shape("r, sqrt(d_in)", vars, NV, d, &nd, err, sizeof err), -1);
    assert_non_null(strstr(err, "sqrt is not allowed"));
    assert_int_equal(expr_eval_shape("r, 1.5", vars, NV, d, &nd, err, sizeof err), -1);
    assert_non_null(strstr(err, "not an integer"));
    assert_int_equal(expr_eval_shape("", vars, NV, d, &nd, err, sizeof err), -1);
    assert_non_null(strstr(err, "empty expression"));

    /* a shape holds at most EXPR_MAX_NUMEL elements: 768^4 fits in int64
     * (3.5e11) but not in the bound; neither does a product across
     * dimensions, nor one that would overflow int64 */
    assert_int_equal(expr_eval_shape("d_model * d_model * d_model * d_model", vars, NV, d, &nd, err, sizeof err), -1);
    assert_string_equal(err, "the shape has more than 2147483647 elements (EXPR_MAX_NUMEL) with dimension 1 "
                             "(347892350976) at column 1");
    assert_int_equal(expr_eval_shape("d_model * d_model, d_model * d_model", vars, NV, d, &nd, err, sizeof err), -1);
    assert_string_equal(err, "the shape has more than 2147483647 elements (EXPR_MAX_NUMEL) with dimension 2 "
                             "(589824) at column 20");
    assert_int_equal(expr_eval_shape("big, big", vars, NV, d, &nd, err, sizeof err), -1);
    assert_non_null(strstr(err, "EXPR_MAX_NUMEL"));
    /* the bound itself is accepted */
    assert_int_equal(expr_eval_shape("2147483647", vars, NV, d, &nd, err, sizeof err), 0);
    assert_int_equal(expr_eval_shape("65536, 32767", vars, NV, d, &nd, err, sizeof err), 0);
    assert_int_equal(expr_eval_shape("65536, 32768", vars, NV, d, &nd, err, sizeof err), -1);
}

static void test_errors(void **state)
{
    (void)state;
    int_fails("r + rr", "unknown name 'rr' at column 5");
    int_fails("1 / zero", "division by zero at column 3");
    int_fails("5 % (r - 8)", "division by zero at column 3");
    float_fails("alpha / zero", "division by zero");
    int_fails("d_in d_out", "unexpected 'd' after the end of the expression at column 6");
    int_fails("(r + 1", "unclosed '(' at column 1");
    int_fails("r + 1)", "unmatched ')' at column 6");
    int_fails("r +", "expression ends too early at column 4");
    int_fails("", "empty expression at column 1");
    int_fails("r * * 2", "column 5");
    int_fails("2r", "malformed number '2r' at column 2");
    int_fails("foo(1)", "unknown function 'foo'");
    int_fails("min(1)", "min takes 2 arguments, given 1");
    int_fails("max(1, 2, 3)", "max takes 2 arguments, given 3");
    int_fails("half * 2", "'half' is 0.5, not an integer");
    int_fails("r $ 2", "unexpected '$'");
    int_fails("big * 4", "integer overflow");
    int_fails("99999999999999999999", "too large");
    int_fails("-9223372036854775807 - 2", "integer overflow");
    float_fails("sqrt(0 - 1)", "sqrt of a negative number");
    float_fails("1e308 * 10", "not finite");
    float_fails("sqrt(1, 2)", "sqrt takes 1 argument, given 2");
    /* Deep nesting is refused, not a stack overflow. */
    char deep[400];
    memset(deep, '(', 200);
    deep[200] = '1';
    memset(deep + 201, ')', 198);
    deep[399] = '\0';
    int_fails(deep, "nested too deeply");
    /* NULL expression and NULL error buffer are handled. */
    int64_t v;
    assert_int_equal(expr_eval_int(NULL, vars, NV, &v, NULL, 0), -1);
}

static void test_check(void **state)
{
    (void)state;
    static const char *const names[] = {"r", "d_in", "d_out", "alpha"};
    char err[256];
    assert_int_equal(expr_check("r, d_in", names, 4, 1, err, sizeof err), 0);
    assert_int_equal(expr_check("alpha / sqrt(r)", names, 4, 0, err, sizeof err), 0);
    /* Values are unknown: no division-by-zero report in check mode. */
    assert_int_equal(expr_check("d_in / (r - r)", names, 4, 0, err, sizeof err), 0);
    assert_int_equal(expr_check("r, d_inn", names, 4, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "unknown name 'd_inn' at column 4"));
    assert_int_equal(expr_check("r * (d_in", names, 4, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "unclosed '('"));
    assert_int_equal(expr_check("alpha / sqrt(r)", names, 4, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "sqrt is not allowed"));
    assert_int_equal(expr_check("r 2", names, 4, 0, err, sizeof err), -1);
    assert_non_null(strstr(err, "column 3"));
    assert_int_equal(expr_check(NULL, names, 4, 0, err, sizeof err), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_integer_arithmetic), cmocka_unit_test(test_float_arithmetic),
        cmocka_unit_test(test_shapes),             cmocka_unit_test(test_errors),
        cmocka_unit_test(test_check),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
