/*
 * test_stream.c - text release for streaming (stop strings, UTF-8
 * hold-back), UTF-8 helpers, and the chat template renderings.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "stream.h"
#include "utf8.h"

/* Feeds pieces one by one; returns everything released, with '|' between
 * the deltas of different feeds (so tests see where text was held back). */
static char *feed_all(const char *const *stops, int n_stops, const char *const *pieces, bool *stopped) {
    textstream ts;
    textstream_init(&ts, stops, n_stops);
    buf out = {0}, all = {0};
    *stopped = false;
    for (int i = 0; pieces[i]; i++) {
        buf_reset(&out);
        if (textstream_feed(&ts, pieces[i], strlen(pieces[i]), &out)) *stopped = true;
        if (i) buf_append(&all, "|", 1);
        buf_append(&all, out.p ? out.p : "", out.len);
        if (*stopped) break;
    }
    if (!*stopped) {
        buf_reset(&out);
        textstream_finish(&ts, &out);
        buf_append(&all, "|", 1);
        buf_append(&all, out.p ? out.p : "", out.len);
    }
    textstream_free(&ts);
    buf_free(&out);
    char *r = strdup(all.p ? all.p : "");
    buf_free(&all);
    return r;
}

START_TEST(test_stop_holdback) {
    const char *stops[] = {"END"};
    bool st;
    /* "E" and "EN" are held back until they cannot be a stop any more. */
    const char *p1[] = {"abc E", "N", "D more", NULL};
    char *r = feed_all(stops, 1, p1, &st);
    ck_assert(st);
    ck_assert_str_eq(r, "abc ||");
    free(r);
    const char *p2[] = {"abc E", "N", "x", NULL};
    r = feed_all(stops, 1, p2, &st);
    ck_assert(!st);
    ck_assert_str_eq(r, "abc ||ENx|");
    free(r);
    /* A stop inside one piece: the text before it is released. */
    const char *p3[] = {"hello ENDworld", NULL};
    r = feed_all(stops, 1, p3, &st);
    ck_assert(st);
    ck_assert_str_eq(r, "hello ");
    free(r);
    /* Earliest of several stops wins. */
    const char *stops2[] = {"world", "lo"};
    const char *p4[] = {"hello world", NULL};
    r = feed_all(stops2, 2, p4, &st);
    ck_assert(st);
    ck_assert_str_eq(r, "hel");
    free(r);
    /* Held text is released at the end when no stop came. */
    const char *p5[] = {"ab", "E", NULL};
    r = feed_all(stops, 1, p5, &st);
    ck_assert(!st);
    ck_assert_str_eq(r, "ab||E");
    free(r);
}
END_TEST

START_TEST(test_utf8_holdback) {
    bool st;
    /* "é" split over two pieces: nothing until it is complete. */
    const char *p1[] = {"caf\xc3", "\xa9!", NULL};
    char *r = feed_all(NULL, 0, p1, &st);
    ck_assert_str_eq(r, "caf|\xc3\xa9!|");
    free(r);
    /* A 4-byte emoji in 4 pieces. */
    const char *p2[] = {"\xf0", "\x9f", "\x98", "\x80", NULL};
    r = feed_all(NULL, 0, p2, &st);
    ck_assert_str_eq(r, "|||\xf0\x9f\x98\x80|");
    free(r);
    /* An incomplete character at the end becomes U+FFFD per byte. */
    const char *p3[] = {"x\xe5\xbd", NULL};
    r = feed_all(NULL, 0, p3, &st);
    ck_assert_str_eq(r, "x|\xef\xbf\xbd\xef\xbf\xbd");
    free(r);
    /* Invalid bytes are replaced, not held. */
    const char *p4[] = {"a\xffz", NULL};
    r = feed_all(NULL, 0, p4, &st);
    ck_assert_str_eq(r, "a\xef\xbf\xbdz|");
    free(r);
}
END_TEST

START_TEST(test_utf8_helpers) {
    ck_assert(utf8_valid("h\xc3\xa9llo", 6));
    ck_assert(!utf8_valid("\xc0\x80", 2));         /* overlong */
    ck_assert(!utf8_valid("\xed\xa0\x80", 3));     /* surrogate */
    ck_assert(!utf8_valid("\xf4\x90\x80\x80", 4)); /* > U+10FFFF */
    ck_assert(!utf8_valid("\xe2\x82", 2));         /* truncated */
    ck_assert_int_eq(utf8_complete_prefix("ab\xe2\x82", 4), 2);
    ck_assert_int_eq(utf8_complete_prefix("ab\xe2\x82\xac", 5), 5);
    ck_assert_int_eq(utf8_complete_prefix("ab\xff", 3), 3);
}
END_TEST

static char *render(const char *family, bool *add_bos) {
    chat_message m[] = {{"system", "S", 1}, {"user", "U", 1}, {"assistant", "A", 1}, {"user", "V", 1}};
    buf text = {0};
    engine_fragment f[64];
    int n = chat_render(family, m, 4, &text, f, 64, add_bos);
    ck_assert_int_gt(n, 0);
    /* Concatenate, marking message contents (not special-parsed) with {}. */
    buf out = {0};
    for (int i = 0; i < n; i++) {
        if (!f[i].parse_special) buf_append(&out, "{", 1);
        buf_append(&out, f[i].text, f[i].len);
        if (!f[i].parse_special) buf_append(&out, "}", 1);
    }
    char *r = strdup(out.p);
    buf_free(&out);
    buf_free(&text);
    return r;
}

START_TEST(test_chat_families) {
    bool bos;
    char *r = render("chatml", &bos);
    ck_assert_str_eq(r, "<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\n"
                        "{A}<|im_end|>\n<|im_start|>user\n{V}<|im_end|>\n<|im_start|>assistant\n");
    free(r);
    r = render("llama3", &bos);
    ck_assert(!bos);
    ck_assert_str_eq(r, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\n{U}<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n{A}<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\n{V}<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n");
    free(r);
    r = render("llama2", &bos);
    ck_assert_str_eq(r, "<s>[INST] <<SYS>>\n{S}\n<</SYS>>\n\n{U} [/INST] {A} </s><s>[INST] {V} [/INST]");
    free(r);
    r = render("mistral", &bos);
    ck_assert_str_eq(r, "<s>[INST] {S}\n\n{U} [/INST]{A}</s>[INST] {V} [/INST]");
    free(r);
    r = render("gemma", &bos);
    ck_assert_str_eq(r, "<bos><start_of_turn>user\n{S}\n\n{U}<end_of_turn>\n<start_of_turn>model\n{A}<end_of_turn>\n"
                        "<start_of_turn>user\n{V}<end_of_turn>\n<start_of_turn>model\n");
    free(r);
    r = render("phi3", &bos);
    ck_assert_str_eq(r, "<|system|>\n{S}<|end|>\n<|user|>\n{U}<|end|>\n<|assistant|>\n{A}<|end|>\n<|user|>\n{V}<|end|>\n"
                        "<|assistant|>\n");
    free(r);
    r = render("zephyr", &bos);
    ck_assert(bos);
    ck_assert_str_eq(r, "<|system|>\n{S}</s>\n<|user|>\n{U}</s>\n<|assistant|>\n{A}</s>\n<|user|>\n{V}</s>\n"
                        "<|assistant|>\n");
    free(r);
}
END_TEST

START_TEST(test_chat_detect) {
    ck_assert_str_eq(chat_detect_family(NULL), "chatml");
    ck_assert_str_eq(chat_detect_family("{% for m in messages %}<|im_start|>{{ m.role }}"), "chatml");
    ck_assert_str_eq(chat_detect_family("<|start_header_id|>' + message['role']"), "llama3");
    ck_assert_str_eq(chat_detect_family("[INST] <<SYS>>"), "llama2");
    ck_assert_str_eq(chat_detect_family("{{ bos_token }}[INST] "), "mistral");
    ck_assert_str_eq(chat_detect_family("<start_of_turn>user"), "gemma");
    ck_assert_str_eq(chat_detect_family("<|user|>\n' + content + '<|end|>"), "phi3");
    ck_assert_str_eq(chat_detect_family("<|user|>\n' + content + eos_token"), "zephyr");
    ck_assert(chat_family_known("llama3"));
    ck_assert(!chat_family_known("jinja"));
}
END_TEST

Suite *stream_suite(void) {
    Suite *s = suite_create("stream");
    TCase *tc = tcase_create("text");
    tcase_add_test(tc, test_stop_holdback);
    tcase_add_test(tc, test_utf8_holdback);
    tcase_add_test(tc, test_utf8_helpers);
    suite_add_tcase(s, tc);
    tc = tcase_create("chat");
    tcase_add_test(tc, test_chat_families);
    tcase_add_test(tc, test_chat_detect);
    suite_add_tcase(s, tc);
    return s;
}
