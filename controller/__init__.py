"""The effectful shell: Ray, processes, HTTP and the loop that drives `states`."""
