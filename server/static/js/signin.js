// The sign-in forms, one set for the room and the console: log in with an account, join as a guest
// (the room's #guest-form) or create an account (the console's #register-form). A page holds the
// forms it offers, with these ids: those present are wired.
import { post } from "./api.js";
import { $ } from "./dom.js";

// `role`: what a new account is; `explain(err)`: a refusal in the page's words, shown in `error`;
// `onSignedIn(user)`: the server signed the user in (its errors are shown as refusals too).
export function wireSignIn({ error, role, explain, onSignedIn }) {
  const requests = {
    "#login-form": () => post("/api/auth/login", { username: $("#login-user").value, password: $("#login-pass").value }),
    "#guest-form": () => post("/api/auth/guest", { name: $("#guest-name").value }),
    "#register-form": () => post("/api/auth/register", { username: $("#reg-user").value, password: $("#reg-pass").value, role }),
  };
  for (const [form, request] of Object.entries(requests)) {
    $(form)?.addEventListener("submit", async (e) => {
      e.preventDefault();
      $(error).textContent = "";
      try {
        await onSignedIn(await request());
      } catch (err) {
        $(error).textContent = explain(err);
      }
    });
  }
}
