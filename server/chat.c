/*
 * chat.c - native renderings of the common chat-template families; see
 * chat.h.  Each follows the family's reference Jinja template for
 * system/user/assistant turns ending in an open assistant turn.
 */
#include "chat.h"

#include <string.h>

static const char *const families[] = {"chatml", "llama2", "llama3", "mistral", "zephyr", "gemma", "phi3"};

const char *chat_family_list(void) { return "chatml, llama2, llama3, mistral, zephyr, gemma, phi3"; }

bool chat_family_known(const char *name) {
    for (size_t i = 0; i < sizeof families / sizeof families[0]; i++)
        if (!strcmp(name, families[i])) return true;
    return false;
}

const char *chat_detect_family(const char *t) {
    if (!t || !*t) return "chatml";
    if (strstr(t, "<|im_start|>")) return "chatml";
    if (strstr(t, "<|start_header_id|>")) return "llama3";
    if (strstr(t, "<start_of_turn>")) return "gemma";
    if (strstr(t, "<|user|>") && strstr(t, "<|end|>")) return "phi3";
    if (strstr(t, "<|user|>")) return "zephyr";
    if (strstr(t, "[INST]") && strstr(t, "<<SYS>>")) return "llama2";
    if (strstr(t, "[INST]")) return "mistral";
    return "chatml";
}

const char *chat_end_marker(const char *family) {
    if (!strcmp(family, "chatml")) return "<|im_end|>";
    if (!strcmp(family, "llama3")) return "<|eot_id|>";
    if (!strcmp(family, "gemma")) return "<end_of_turn>";
    if (!strcmp(family, "phi3")) return "<|end|>";
    return "</s>";
}

/* ==== Fragment builder ================================================= */

typedef struct {
    buf *text;
    engine_fragment *frags;
    size_t *offs; /* offsets into text until the end, when pointers are fixed */
    int n, max;
    bool overflow;
} builder;

static void add(builder *b, const char *s, size_t len, bool special) {
    if (len == 0) return;
    /* Merge with the previous fragment of the same kind. */
    if (b->n > 0 && b->frags[b->n - 1].parse_special == special &&
        b->offs[b->n - 1] + b->frags[b->n - 1].len == b->text->len) {
        buf_append(b->text, s, len);
        b->frags[b->n - 1].len += len;
        return;
    }
    if (b->n == b->max) {
        b->overflow = true;
        return;
    }
    b->offs[b->n] = b->text->len;
    b->frags[b->n] = (engine_fragment){NULL, len, special};
    buf_append(b->text, s, len);
    b->n++;
}

#define T(b, s) add(b, s, strlen(s), true)
#define C(b, m) add(b, (m)->content, (m)->len, false)

static bool is(const chat_message *m, const char *role) { return !strcmp(m->role, role); }

int chat_render(const char *family, const chat_message *msgs, int n, buf *text, engine_fragment *frags, int max_frags,
                bool *add_bos) {
    size_t offs[max_frags > 0 ? max_frags : 1];
    builder b = {text, frags, offs, 0, max_frags, false};
    *add_bos = false;
    if (!strcmp(family, "llama3")) {
        T(&b, "<|begin_of_text|>");
        for (int i = 0; i < n; i++) {
            T(&b, "<|start_header_id|>");
            T(&b, msgs[i].role);
            T(&b, "<|end_header_id|>\n\n");
            C(&b, &msgs[i]);
            T(&b, "<|eot_id|>");
        }
        T(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    } else if (!strcmp(family, "llama2") || !strcmp(family, "mistral")) {
        /* [INST] turns; a system message goes into the first user turn. */
        bool llama2 = !strcmp(family, "llama2");
        const chat_message *sys = NULL;
        bool first_user = true;
        if (!llama2) T(&b, "<s>"); /* Mistral: one BOS for the conversation */
        for (int i = 0; i < n; i++) {
            const chat_message *m = &msgs[i];
            if (is(m, "system")) {
                sys = m;
                continue;
            }
            if (is(m, "user")) {
                if (llama2) T(&b, "<s>"); /* Llama 2: a BOS per turn */
                T(&b, "[INST] ");
                if (sys && first_user) {
                    if (llama2) {
                        T(&b, "<<SYS>>\n");
                        C(&b, sys);
                        T(&b, "\n<</SYS>>\n\n");
                    } else {
                        C(&b, sys);
                        T(&b, "\n\n");
                    }
                }
                first_user = false;
                C(&b, m);
                T(&b, " [/INST]");
            } else if (llama2) {
                T(&b, " ");
                C(&b, m);
                T(&b, " </s>");
            } else {
                C(&b, m);
                T(&b, "</s>");
            }
        }
    } else if (!strcmp(family, "zephyr") || !strcmp(family, "phi3")) {
        const char *end = !strcmp(family, "phi3") ? "<|end|>" : "</s>";
        if (!strcmp(family, "zephyr")) *add_bos = true;
        for (int i = 0; i < n; i++) {
            T(&b, "<|");
            T(&b, msgs[i].role);
            T(&b, "|>\n");
            C(&b, &msgs[i]);
            T(&b, end);
            T(&b, "\n");
        }
        T(&b, "<|assistant|>\n");
    } else if (!strcmp(family, "gemma")) {
        /* No system role: it is prepended to the first user turn. */
        T(&b, "<bos>");
        const chat_message *sys = NULL;
        bool first_user = true;
        for (int i = 0; i < n; i++) {
            const chat_message *m = &msgs[i];
            if (is(m, "system")) {
                sys = m;
                continue;
            }
            T(&b, "<start_of_turn>");
            T(&b, is(m, "assistant") ? "model" : "user");
            T(&b, "\n");
            if (sys && first_user && is(m, "user")) {
                C(&b, sys);
                T(&b, "\n\n");
                first_user = false;
            }
            C(&b, m);
            T(&b, "<end_of_turn>\n");
        }
        T(&b, "<start_of_turn>model\n");
    } else { /* chatml */
        *add_bos = true; /* as the model's own setting decides */
        for (int i = 0; i < n; i++) {
            T(&b, "<|im_start|>");
            T(&b, msgs[i].role);
            T(&b, "\n");
            C(&b, &msgs[i]);
            T(&b, "<|im_end|>\n");
        }
        T(&b, "<|im_start|>assistant\n");
    }
    if (b.overflow) return -1;
    for (int i = 0; i < b.n; i++) frags[i].text = text->p + offs[i];
    return b.n;
}
