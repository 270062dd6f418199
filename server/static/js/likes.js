// The like button on the video: a tap counts on screen at once, floats a heart, and goes to the
// room in a batch.
import { $, el } from "./dom.js";

// `state`: the room page's (who is signed in); `signIn()` opens the sign-in panel.
export function likesPanel({ state, socket, signIn }) {
  let likes = 0; // the room's total, with our batches since
  let pendingTaps = 0; // not sent yet

  function render() {
    $("#like-count").textContent = String(likes + pendingTaps);
  }

  function floatHeart() {
    const heart = el("span", { class: "heart" }, ["♥", "❤", "💖", "💗"][Math.floor(Math.random() * 4)]);
    $("#stage").append(heart);
    const drift = (Math.random() - 0.5) * 80;
    heart.animate(
      [{ transform: "translate(0, 0) scale(.8)", opacity: 1 }, { transform: `translate(${drift}px, -180px) scale(1.3)`, opacity: 0 }],
      { duration: 1400, easing: "ease-out" },
    ).onfinish = () => heart.remove();
  }

  $("#like").addEventListener("click", () => {
    if (!state.me) return signIn();
    pendingTaps += 1;
    render();
    floatHeart();
    return undefined;
  });

  // Taps are batched: one frame every 300 ms at most, whatever the tapping speed.
  setInterval(() => {
    if (!pendingTaps) return;
    const count = Math.min(50, pendingTaps);
    if (socket.send({ type: "like", count })) {
      pendingTaps -= count;
      likes += count; // the server's next total confirms it
    }
  }, 300);

  return {
    // A welcome's total replaces ours; a later total may lag behind our batches in flight.
    welcome(total) {
      likes = total;
      render();
    },
    update(total) {
      likes = Math.max(likes, total);
      render();
    },
  };
}
